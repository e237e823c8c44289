"""Chapter 02: what makes universal neurons different (paper §3-4.2).

- `neuron_stats`  per-neuron weight and activation statistics (`python -m helpers.properties.neuron_stats`)
- `compare`       a neuron set against the rest: medians, within-layer percentiles, the set's size
- `significance`  permutation tests with the multiplicity correction
- `verdicts`      the chapter's "Result vs paper" rows
"""

# The chapter's notebook imports this package alone (`from helpers import properties`) and reaches its
# modules as attributes.
from . import neuron_stats, compare, significance, verdicts  # noqa: E402,F401

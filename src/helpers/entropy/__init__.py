"""Chapter 05: entropy neurons (paper §5.2).

- `candidates`     entropy-neuron candidates from the weights: norm, unembedding variance, null space
- `interventions`  fixed-activation sweeps with total and direct effects separated
- `verdicts`       the chapter's "Result vs paper" rows, and where its candidates stand in chapter 01's set
"""

# The chapter's notebook imports this package alone (`from helpers import entropy`) and reaches its
# modules as attributes.
from . import candidates, interventions, verdicts  # noqa: E402,F401

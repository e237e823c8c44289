"""Chapter 06: attention (de)activation neurons (paper §5.3).

- `heads`     BOS value norms, the heuristic score of every (neuron, later head) pair, path ablation
- `verdicts`  the chapter's "Result vs paper" rows, and how the set's neurons score against the rest
"""

# The chapter's notebook imports this package alone (`from helpers import attention`) and reaches its
# modules as attributes.
from . import heads, verdicts  # noqa: E402,F401

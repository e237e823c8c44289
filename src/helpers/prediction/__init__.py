"""Chapter 04: prediction, suppression and partition neurons (paper §5.1).

- `vocab`     what a neuron writes into the next-token logits: W_U w_out moments, classes, by depth
- `verdicts`  the chapter's "Result vs paper" rows, and how its set view moves with the set's size
"""

# The chapter's notebook imports this package alone (`from helpers import prediction`) and reaches its
# modules as attributes.
from . import vocab, verdicts  # noqa: E402,F401

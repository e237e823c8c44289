"""Chapter 05: entropy neurons (paper §5.2).

- `candidates`     entropy-neuron candidates from the weights: norm, unembedding variance, null space
- `interventions`  fixed-activation sweeps with total and direct effects separated
"""

# The chapter's notebook imports this package alone (`from helpers import entropy`) and reaches its
# modules as attributes.
from . import candidates, interventions  # noqa: E402,F401

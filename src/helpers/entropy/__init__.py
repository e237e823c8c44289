"""Chapter 05: entropy neurons (paper §5.2).

- `candidates`     entropy-neuron candidates from the weights: norm, unembedding variance, null space
- `interventions`  fixed-activation sweeps with total and direct effects separated
- `frequency`      beyond the paper: token-frequency neurons (Stolfo et al. 2024)
"""

# The chapter's notebook imports this package alone (`from helpers import entropy`) and reaches its
# modules as attributes.
from . import candidates, interventions, frequency  # noqa: E402,F401

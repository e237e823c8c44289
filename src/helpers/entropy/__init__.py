"""Chapter 05: entropy neurons (paper §5.2).

- `candidates`     entropy-neuron candidates from the weights: norm, unembedding variance, null space
- `interventions`  fixed-activation sweeps with total and direct effects separated
- `verdicts`       the chapter's "Result vs paper" rows, and where its candidates stand in chapter 01's set
- `frequency`      beyond the paper: token-frequency neurons (Stolfo et al. 2024)
"""

# The chapter's notebook imports this package alone (`from helpers import entropy`) and reaches its
# modules as attributes.
from . import candidates, frequency, interventions, verdicts  # noqa: E402,F401

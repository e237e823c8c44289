"""Chapter 01: which neurons are universal (paper §2).

- `pearson`         blocked correlations, the rotation baselines, maxima and excess correlation
- `correlate`       the correlation job over a family (`python -m helpers.correlations.correlate`)
- `universality`    the per-neuron universality table turned into the chapter's quantities
- `baselines`       rotation baselines redrawn from a finished run
- `dimensionality`  effective dimension of a layer's activations (why small models have high baselines)
- `checks`          build checks a broken analysis would fail
- `sweep`           the recorded configuration sweep of the embedded family
- `verdicts`        the chapter's "Result vs paper" rows
- `ablation`        beyond the paper: mean ablation of the set against random neurons (Nandan et al. 2025)
- `persistence`     beyond the paper: the set over the training checkpoints (Nandan et al. 2025)
"""

# The chapter's notebook imports this package alone (`from helpers import correlations`) and reaches its
# modules as attributes.
from . import (pearson, correlate, universality, baselines, dimensionality, checks, sweep,  # noqa: E402,F401
               verdicts, ablation, persistence)

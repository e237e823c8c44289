"""Numbers reported by the paper (Gurnee et al., 2024, arXiv v1) and computed from its released
tables, for the "Result vs paper" comparisons. Source notes are in the book's chapters."""

# §4.1 / §6.3: neurons with excess correlation > 0.5
UNIVERSAL_SHARE = {"stanford-gpt2-small": 0.0416, "stanford-gpt2-medium": 0.0123, "pythia-160m": 0.0126}
UNIVERSAL_COUNT = {"stanford-gpt2-small": 1533, "stanford-gpt2-medium": 1211, "pythia-160m": 465}
N_NEURONS = {"stanford-gpt2-small": 36864, "stanford-gpt2-medium": 98304, "pythia-160m": 36864}

# Universal neurons per layer, % of the layer (computed from the released CSVs)
UNIVERSAL_PCT_BY_LAYER = {
    "stanford-gpt2-small": [7.2, 7.9, 3.3, 3.6, 2.3, 2.3, 1.8, 3.7, 3.3, 4.6, 4.1, 5.8],
    "stanford-gpt2-medium": [3.2, 3.4, 1.1, 1.0, 1.0, 0.7, 0.6, 0.5, 0.6, 0.6, 0.6, 0.4, 0.9, 0.9, 1.4, 1.3, 1.3, 1.4,
                             1.2, 1.3, 1.1, 1.3, 1.5, 2.3],
    "pythia-160m": [2.1, 0.5, 0.6, 0.2, 0.9, 1.1, 1.4, 1.3, 2.2, 1.6, 1.6, 1.7],
}

# Mean over neurons of (max over seeds - min over seeds) of the max correlation (GPT2-medium-a)
SEED_SPREAD_ALL = 0.049
SEED_SPREAD_UNIVERSAL = 0.105

# Medians over universal neurons (released CSVs): mean_corr ~0.75, mean_baseline ~0.15-0.16
MEDIAN_MEAN_CORR_UNIVERSAL = 0.75
MEDIAN_BASELINE_UNIVERSAL = 0.155
EXCESS_THRESHOLD = 0.5

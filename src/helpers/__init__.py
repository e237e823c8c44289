"""Helper package of the executable reproduction of "Universal Neurons in GPT2 Language Models"
(Gurnee et al., 2024, arXiv:2401.12181).

All real logic of the book lives here; the notebooks call it and plot. One subpackage per concern,
from the bottom up (a subpackage imports only those above it in this list, see tests/test_layering.py):

- `core`          presets, command-line options, the on-disk cache, the paper's registry and verdict rule,
                  computed sentences
- `data`          the GPT-2 tokenizer, token rows, the embedded corpus
- `models`        chapter 00: model loading, the family's weights, training, and seed families
- `streaming`     the activation pass every chapter's data goes through, and its accumulators
- `correlations`  chapter 01: which neurons are universal
- `properties`    chapter 02: what makes them different
- `taxonomy`      chapter 03: neuron families by variance reduction
- `prediction`    chapter 04: prediction, suppression and partition neurons
- `entropy`       chapter 05: entropy neurons
- `attention`     chapter 06: attention (de)activation neurons
- `book`          figures, the neuron browser, the end-to-end build (`python -m helpers.book`)
"""

import warnings

__version__ = "0.1.0"

# Progress bars use tqdm.auto: a widget in Jupyter when ipywidgets is installed, text otherwise
# (papermill, nbmake). The text fallback is fine; its warning is noise.
try:
    from tqdm import TqdmExperimentalWarning, TqdmWarning

    warnings.filterwarnings("ignore", category=TqdmWarning)
    warnings.filterwarnings("ignore", category=TqdmExperimentalWarning)
except ImportError:  # pragma: no cover
    pass
warnings.filterwarnings("ignore", message="HookedTransformer is deprecated", category=DeprecationWarning)

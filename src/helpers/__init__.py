"""Helper package of the executable reproduction of "Universal Neurons in GPT2 Language Models"
(Gurnee et al., 2024, arXiv:2401.12181).

All real logic of the book lives here; the notebooks call it and plot. One module per concern:

- `presets`   the checked, read-only preset of `params/*.yaml`; resolve paths
- `artifacts` on-disk cache keyed by what produced a result
- `data`      GPT-2 tokenizer, reduced vocabularies, token batches, token filtering
- `corpus`    the embedded corpus (Debian documentation, CPython standard library, dictionaries)
- `models`    model configs, safetensors save/load, the family registry, weight access
- `train`     training of the embedded seed family (`python -m helpers.train`)
- `plots`     plotly set-up and figure style
- `book`      the end-to-end book build (`python -m helpers.book`)
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

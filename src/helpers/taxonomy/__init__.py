"""Chapter 03: neuron families by variance reduction (paper §4.3).

- `features`  binary labels of every analysed token
- `explain`   variance reduction of every neuron by every label, families, best labels
- `verdicts`  the chapter's "Result vs paper" rows
"""

# The chapter's notebook imports this package alone (`from helpers import taxonomy`) and reaches its
# modules as attributes.
from . import features, explain, verdicts  # noqa: E402,F401

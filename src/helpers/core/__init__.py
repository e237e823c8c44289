"""Configuration, cache and the paper's registry: what every other part of the package stands on.

- `presets`  the checked, read-only preset of `params/*.yaml`, parsed once (architecture, recipe, artifacts path)
- `cli`      command-line options resolved against a preset, the same way for every `python -m helpers...` job
- `cache`    the on-disk cache keyed by what produced a result (atomic writes, locks, checkpoints)
- `paper`    the paper's numbers with their sources, and the rule that turns a measurement into a verdict
- `report`   sentences whose numbers are read from computed tables
"""

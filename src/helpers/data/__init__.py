"""Tokens and text.

- `tokens`   the GPT-2 tokenizer (vendored in `tokenizer_gpt2/`), reduced vocabularies, token rows
- `corpus`   the embedded corpus built from sources that install offline (`python -m helpers.data.corpus`)
- `hub`      reachability of the Hugging Face hub, for the paper-scale presets
"""

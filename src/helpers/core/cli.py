"""Command-line options resolved against a preset: every `python -m helpers...` job reads its
defaults from the preset it is given, the same way.

`preset_parser(description, keys)` is an `ArgumentParser` with `--preset` and one flag per preset
key in `keys` (`--n-tokens` sets `n_tokens`), each defaulting to "the preset's value";
`preset_from_args(args)` loads the preset with the flags that were given as overrides, checked as
the file is (a wrong type or value is an error naming the key). A job then reads every setting
from the returned `Preset`, never from the flags again.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from helpers.core.presets import BASELINES, TOP_KEYS, Preset, load_preset

# Flags whose values are not strings; `choices` where the preset allows only a few values.
OPTION_TYPES = {"n_tokens": int, "n_tokens_aux": int, "n_tokens_single": int, "batch_size": int, "n_seeds": int,
                "train_seed": int, "baseline_seed": int, "sample_seed": int, "threshold": float}
OPTION_CHOICES = {"baseline": BASELINES}


def add_preset_options(ap: argparse.ArgumentParser, keys: Sequence[str],
                       default_preset: str | None = "default") -> None:
    """Add `--preset` (required when `default_preset` is None) and one flag per preset key of `keys`."""
    unknown = [k for k in keys if k not in TOP_KEYS or k == "preset"]
    if unknown:
        raise ValueError(f"{unknown} are not preset keys a flag can override; keys: {', '.join(TOP_KEYS)}")
    if default_preset is None:
        ap.add_argument("--preset", required=True, help="params/<preset>.yaml, or a path to a .yaml file")
    else:
        ap.add_argument("--preset", default=default_preset,
                        help="params/<preset>.yaml, or a path to a .yaml file (default: %(default)s)")
    for k in keys:
        ap.add_argument("--" + k.replace("_", "-"), dest=k, default=None, type=OPTION_TYPES.get(k, str),
                        choices=OPTION_CHOICES.get(k),
                        help=f"{TOP_KEYS[k].doc} (default: the preset's `{k}`)")
    ap.set_defaults(preset_keys=tuple(keys))


def preset_parser(description: str, keys: Sequence[str], default_preset: str | None = "default",
                  **kwargs) -> argparse.ArgumentParser:
    """An `ArgumentParser` with the preset options of `add_preset_options`."""
    ap = argparse.ArgumentParser(description=description, **kwargs)
    add_preset_options(ap, keys, default_preset)
    return ap


def preset_from_args(args: argparse.Namespace) -> Preset:
    """The preset named by `--preset`, with every preset flag that was given applied as an override."""
    keys = getattr(args, "preset_keys", ())
    return load_preset(args.preset, **{k: getattr(args, k) for k in keys})

"""Presets: one typed, read-only configuration per `params/<name>.yaml`, and the paths it names.

A preset is the flat set of run parameters (`family`, `n_tokens`, `device`, the three seeds, ...)
plus two optional blocks for the embedded seed family (`corpus`, `embedded`). The same file drives
the notebooks (`papermill ... -p preset <name>` or `-f params/<name>.yaml`) and the command-line
jobs (`python -m helpers.models.training --preset <name>`).

`load_preset(name, **overrides)` reads a file into a `Preset`: a frozen dataclass that is also a
read-only mapping (`params["n_tokens"]`, `params.get("corpus", {})`, `"embedded" in params`,
`params.n_tokens`). Every key is checked: an unknown key at any level is an error naming the file,
the key and the closest valid key; a missing required key is an error naming it. The `embedded`
block is parsed once, here, into two frozen objects the trainer and the loaders take as they are:
`params.arch` (an `Architecture`) and `params.recipe` (a `Recipe`, defaults filled in). The cache
folder is `params.artifacts_path`, resolved against the repository root.

Every size a chapter uses is a key of its own, grouped by chapter (`explain_tokens`,
`attention_single_tokens`, ...), so that no notebook derives one from another with arithmetic. A
size that is a part of another key's (a prefix of the token table `n_tokens` sizes, say) must not
exceed it (`SUBSAMPLES`): a file that says otherwise is an error naming both keys; an override that
lowers the bound (`-p n_tokens 5000`) lowers with it the sizes it leaves unchanged.

The three seeds are separate, so that changing one never changes what the others determine:
`train_seed` (the embedded family's training: member `a` uses it, `b` it + 1, ...),
`baseline_seed` (the correlation's random rotation baseline) and `sample_seed` (text samples).

This module is the bottom layer: it imports no other helpers module.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

PRESET_ENV = "UNIVERSAL_NEURONS_PARAMS"
BASELINES = ("rotation", "gaussian")
PRECISIONS = ("auto", "fp32", "bf16")


class PresetError(ValueError):
    """A preset file or an override that does not fit the schema; the message says where and what."""


class PresetKeyError(KeyError):
    """A lookup of a name that is not a preset key (or an optional key this preset leaves out)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ---- value checks: each returns the (normalised) value or raises _Bad naming what was expected ----

class _Bad(Exception):
    pass


def _int(v):
    if isinstance(v, bool) or not isinstance(v, int):
        raise _Bad("an integer")
    return v


def _positive_int(v):
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise _Bad("a positive integer")
    return v


def _seed(v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise _Bad("a non-negative integer")
    return v


def _float(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _Bad("a number")
    return float(v)


def _fraction(v):
    v = _float(v)
    if not 0.0 <= v <= 1.0:
        raise _Bad("a number between 0 and 1")
    return v


def _str(v):
    if not isinstance(v, str) or not v:
        raise _Bad("a non-empty string")
    return v


def _one_of(*choices: str) -> Callable:
    def check(v):
        if v not in choices:
            raise _Bad("one of " + ", ".join(repr(c) for c in choices))
        return v

    return check


def _optional(check: Callable) -> Callable:
    def optional(v):
        if v is None:
            return None
        try:
            return check(v)
        except _Bad as e:
            raise _Bad(f"{e} or null") from None

    return optional


def _list_of(check: Callable, length: int | None = None) -> Callable:
    def list_of(v):
        if not isinstance(v, (list, tuple)) or (length is not None and len(v) != length):
            raise _Bad(f"a list of {length or 'any number of'} values")
        return FrozenList(check(x) for x in v)

    return list_of


def _grid(v):
    if not isinstance(v, (list, tuple)) or not v:
        raise _Bad("a non-empty list of numbers")
    try:
        return FrozenList(_float(x) for x in v)
    except _Bad:
        raise _Bad("a non-empty list of numbers") from None


@dataclass(frozen=True)
class _Key:
    check: Callable | None  # None for a block, checked against its own schema
    required: bool
    doc: str


# ---- the schema ----

# The `embedded` block: architecture (the fields of `Architecture`, all required) and training recipe
# (the fields of `Recipe`, each optional: left out, the recipe's default).
EMBEDDED_KEYS: dict[str, _Key] = {
    "n_layers": _Key(_positive_int, True, "transformer blocks"),
    "d_model": _Key(_positive_int, True, "residual stream width"),
    "n_heads": _Key(_positive_int, True, "attention heads per block"),
    "d_mlp": _Key(_positive_int, True, "MLP neurons per block"),
    "n_ctx": _Key(_positive_int, True, "context length (tokens per row)"),
    "d_vocab": _Key(_positive_int, True, "reduced vocabulary size (the most frequent GPT-2 tokens + 1 unknown id)"),
    "train_tokens": _Key(_positive_int, False, "training tokens per member"),
    "batch_size": _Key(_positive_int, False, "training rows per step"),
    "lr": _Key(_float, False, "peak learning rate"),
    "min_lr_frac": _Key(_fraction, False, "final learning rate as a fraction of the peak"),
    "warmup_frac": _Key(_fraction, False, "fraction of the steps spent warming up"),
    "weight_decay": _Key(_float, False, "AdamW weight decay"),
    "betas": _Key(_list_of(_float, 2), False, "AdamW betas"),
    "grad_clip": _Key(_float, False, "gradient norm clip"),
    "n_checkpoints": _Key(_int, False, "training checkpoints kept per member"),
    "precision": _Key(_one_of(*PRECISIONS), False, "training precision"),
    "eval_tokens": _Key(_positive_int, False, "held-out tokens of the validation loss"),
}

# The `corpus` block (helpers.data.corpus.corpus_config fills in what is left out).
CORPUS_KEYS: dict[str, _Key] = {
    "sources": _Key(_list_of(_str), False, "embedded corpus sources (helpers.data.corpus.SOURCES)"),
    "text_dirs": _Key(_list_of(_str), False, "folders of your own text files, added as sources"),
    "max_chars_per_source": _Key(_optional(_positive_int), False, "characters taken from each source (null: all)"),
    "val_fraction": _Key(_fraction, False, "share of documents held out (the analyses' tokens)"),
}


@dataclass(frozen=True)
class Architecture(Mapping):
    """The embedded models' shape (a GPT-2-style `HookedTransformer`). Read by attribute
    (`arch.n_ctx`) or as a read-only mapping (`arch["n_ctx"]`), so the model constructors take it
    as they take the `arch` of a saved model's config.json."""

    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    n_ctx: int
    d_vocab: int

    def __getitem__(self, key: str) -> int:
        if key not in ARCH_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(ARCH_KEYS)

    def __len__(self) -> int:
        return len(ARCH_KEYS)

    def to_dict(self) -> dict[str, int]:
        """{key: int} in field order: what cache keys and records store."""
        return {k: int(getattr(self, k)) for k in ARCH_KEYS}


@dataclass(frozen=True)
class Recipe:
    """How each member of the embedded family is trained: the `embedded` block's recipe keys, the
    defaults below where the block leaves one out."""

    train_tokens: int = 3_000_000  # training tokens per member
    batch_size: int = 32           # rows per step
    lr: float = 3e-3               # peak learning rate
    min_lr_frac: float = 0.1       # final learning rate as a fraction of the peak (cosine decay)
    warmup_frac: float = 0.05      # fraction of the steps spent warming up
    weight_decay: float = 0.1      # AdamW weight decay (matrices only)
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas
    grad_clip: float = 1.0         # gradient norm clip
    n_checkpoints: int = 4         # checkpoints kept per member besides the initialisation
    precision: str = "auto"        # auto | fp32 | bf16 (auto: bf16 autocast only where it is faster)
    eval_tokens: int = 200_000     # held-out tokens of the validation loss

    def __post_init__(self):
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.precision not in PRECISIONS:
            raise PresetError(f"recipe precision must be one of {PRECISIONS}, got {self.precision!r}")

    def n_steps(self, n_ctx: int) -> int:
        """Optimizer steps of one member: `train_tokens` in batches of `batch_size` rows of `n_ctx`."""
        return max(1, int(self.train_tokens) // (int(self.batch_size) * int(n_ctx)))

    def to_dict(self) -> dict[str, Any]:
        """Every key with its value (`betas` as a list): what cache keys and records store."""
        return {**asdict(self), "betas": list(self.betas)}


ARCH_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Architecture))
RECIPE_DEFAULTS: dict[str, Any] = Recipe().to_dict()


def parse_embedded(block: Mapping) -> tuple[Architecture, Recipe]:
    """A checked `embedded` block -> (architecture, recipe with its defaults filled in)."""
    arch = Architecture(**{k: int(block[k]) for k in ARCH_KEYS})
    return arch, Recipe(**{k: v for k, v in block.items() if k in RECIPE_DEFAULTS})


# Former keys, with what replaced them.
RENAMED = {
    "seed": "`seed` was split into `train_seed` (training of the embedded family), `baseline_seed` "
            "(the correlation's rotation baseline) and `sample_seed` (text samples): set these three instead",
    "autocast_bf16": "`autocast_bf16` was replaced by `precision: auto | fp32 | bf16` in the `embedded` block",
}


@dataclass(frozen=True, eq=False)
class Preset(Mapping):
    """One run's configuration, read-only. Read it as a mapping (`params["n_tokens"]`) or by
    attribute (`params.n_tokens`); change it only by making a new one (`params.replace(...)`)."""

    family: str               # the model family (helpers.models.families.KNOWN_FAMILIES)
    reference: str            # the member the others are compared with (short `a` or full name)
    device: str               # torch device: cpu, cuda, mps
    artifacts_dir: str        # cache folder; relative paths are relative to the repository root
    n_tokens: int             # held-out tokens of the main correlation and statistics passes
    n_tokens_aux: int         # tokens of the auxiliary passes (training checkpoints, examples)
    n_tokens_single: int      # tokens of the single model's token table (chapters 02-06 read prefixes)
    batch_size: int           # rows per forward pass of the analyses
    single_batch_size: int    # rows per forward pass of single_model (its rows are longer)
    threshold: float          # excess correlation above which a neuron counts as universal
    baseline: str             # the correlation baseline: rotation (seeded orthogonal) or gaussian
    train_seed: int           # base seed of the embedded family's training (member a: +0, b: +1, ...)
    baseline_seed: int        # seed of the correlation's random baseline
    sample_seed: int          # seed of the text samples (chapter 00)
    single_model: str         # the real pretrained model of the single-model analyses (chapters 02-06)
    # Sizes, by chapter, set per preset (a CI preset keeps them small). A `*_tokens` key is a prefix
    # of the token table its bound sizes (SUBSAMPLES), never more than it.
    # chapter 00
    control_loss_tokens: int           # held-out tokens of the untrained control's loss
    # chapter 01
    context_tokens: int                # held-out tokens searched for the top neurons' contexts
    check_tokens: int                  # tokens of the copy checks
    # chapter 02
    properties_single_tokens: int      # tokens of the single model's statistics (half: convergence)
    properties_single_vocab_neurons: int | None  # neurons per layer with W_U moments in its statistics (null: all)
    # chapter 03
    explain_tokens: int                # tokens of the reference model's variance reduction
    explain_single_tokens: int         # tokens of the single model's variance reduction
    explain_min_positive: int          # positive (and negative) tokens a label needs to be tested
    # chapter 04
    conditioning_tokens: int           # tokens of the next-token conditioning (Fig 24)
    conditioning_single_tokens: int    # the single model's tokens of the same
    vocab_single_neurons: int | None   # neurons per layer of the single model's W_U moments (null: all)
    # chapter 05
    entropy_rows: int                  # token rows (of the family's n_ctx) of the entropy interventions
    entropy_single_ctx: int            # tokens per row of the single model's entropy interventions
    entropy_single_rows: int           # rows of the single model's entropy interventions
    entropy_single_random: int | None  # random neurons of its entropy baseline (null: the paper's count)
    entropy_single_random_rows: int    # other rows of its random neurons (and its frequency study)
    entropy_single_random_ctx: int     # tokens per row of those rows
    entropy_random_grid: list[float]   # grid points of the single model's and the control's random neurons
    # chapter 06
    attention_tokens: int              # tokens of the path ablation
    attention_top_pairs: int           # pairs ablated at each end of h_n
    attention_random_pairs: int        # random pairs ablated
    attention_single_tokens: int       # the single model's tokens of the path ablation
    attention_single_top_pairs: int    # its pairs ablated at each end of h_n (and the second model's)
    attention_single_random_pairs: int  # its random pairs ablated (and the second model's)
    bos_rows: int                      # token rows of the single model's BOS value norms
    bos_ctx: int                       # tokens of each of those rows (their first bos_ctx tokens)
    second_tokens: int                 # the second model's tokens of its signs and path ablation
    second_bos_rows: int               # the first rows of bos_rows that its BOS value norms use
    second_model: str | None = None  # a second real model beside single_model (chapter 06); null: none
    preset: str | None = None  # the preset's name (the file's stem unless the file says otherwise)
    n_seeds: int | None = None  # members of the embedded family (2-5; default all five)
    corpus: Mapping | None = None    # the embedded corpus (CORPUS_KEYS)
    embedded: Mapping | None = None  # the embedded family's architecture and recipe (EMBEDDED_KEYS)
    path: Path | None = field(default=None, repr=False)  # the file it was read from (not a key)
    # The `embedded` block parsed (None without one): set from it, never given.
    arch: Architecture | None = field(default=None, init=False, repr=False, compare=False)
    recipe: Recipe | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        problems, bad = [], set()
        for name, key in TOP_KEYS.items():
            value = getattr(self, name)
            if value is None and not key.required:
                continue
            if name in BLOCKS:
                value, block_problems = _check_block(value, name, BLOCKS[name])
                problems += block_problems
            else:
                try:
                    value = key.check(value)
                except _Bad as e:
                    problems.append(f"`{name}` must be {e}, got {value!r}")
                    bad.add(name)
                    continue
            object.__setattr__(self, name, value)
        problems += [_too_large(k, getattr(self, k), b, getattr(self, b)) for k, b in SUBSAMPLES.items()
                     if not {k, b} & bad and getattr(self, k) > getattr(self, b)]
        if isinstance(self.family, str) and self.family.startswith("embedded") and self.embedded is None:
            problems.append(f"family {self.family!r} needs an `embedded` block (the architecture and recipe of its models)")
        if problems:
            raise PresetError(f"{_where(self.path)}: " + "; ".join(problems))
        if self.embedded is not None:
            arch, recipe = parse_embedded(self.embedded)
            object.__setattr__(self, "arch", arch)
            object.__setattr__(self, "recipe", recipe)

    @property
    def artifacts_path(self) -> Path:
        """The cache folder `artifacts_dir`, resolved against the repository root (and created)."""
        return resolve_dir(self.artifacts_dir)

    # read-only mapping view: the keys this preset sets (optional keys it leaves out are absent;
    # a required key is always present, null where its value may be null)
    def __getitem__(self, key: str) -> Any:
        if key not in TOP_KEYS:
            raise PresetKeyError(_unknown_key_message(key, TOP_KEYS, f"{_where(self.path)}: no preset key"))
        value = getattr(self, key)
        if value is None and not TOP_KEYS[key].required:
            raise PresetKeyError(f"{_where(self.path)}: preset {self.preset!r} does not set `{key}`")
        return value

    def __iter__(self) -> Iterator[str]:
        return (k for k in TOP_KEYS if getattr(self, k) is not None or TOP_KEYS[k].required)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def get(self, key: str, default: Any = None) -> Any:
        """`params.get(key, default)`; a name that is no preset key is an error, not the default."""
        if key not in TOP_KEYS:
            raise PresetKeyError(_unknown_key_message(key, TOP_KEYS, f"{_where(self.path)}: no preset key"))
        value = getattr(self, key)
        return default if value is None else value

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-serialisable copy (lists and dicts, no read-only types)."""
        return {k: _thaw(v) for k, v in self.items()}

    def replace(self, **overrides: Any) -> Preset:
        """A new preset with `overrides` applied (None keeps the value); checked like a file."""
        return _apply_overrides(self, overrides)


TOP_KEYS: dict[str, _Key] = {
    "family": _Key(_str, True, "the model family"),
    "reference": _Key(_str, True, "the reference member"),
    "device": _Key(_str, True, "torch device"),
    "artifacts_dir": _Key(_str, True, "cache folder"),
    "n_tokens": _Key(_positive_int, True, "tokens of the main passes"),
    "n_tokens_aux": _Key(_positive_int, True, "tokens of the auxiliary passes"),
    "n_tokens_single": _Key(_positive_int, True, "tokens of the single model's token table"),
    "batch_size": _Key(_positive_int, True, "rows per forward pass"),
    "single_batch_size": _Key(_positive_int, True, "rows per forward pass of single_model"),
    "threshold": _Key(_float, True, "universality threshold on the excess correlation"),
    "baseline": _Key(_one_of(*BASELINES), True, "correlation baseline"),
    "train_seed": _Key(_seed, True, "base seed of the embedded family's training"),
    "baseline_seed": _Key(_seed, True, "seed of the correlation's random baseline"),
    "sample_seed": _Key(_seed, True, "seed of the text samples"),
    "single_model": _Key(_str, True, "the real pretrained model of chapters 02-06"),
    # sizes, by chapter (SUBSAMPLES: the keys that must not exceed another)
    "control_loss_tokens": _Key(_positive_int, True, "held-out tokens of the untrained control's loss (chapter 00)"),
    "context_tokens": _Key(_positive_int, True, "held-out tokens searched for the top neurons' contexts (chapter 01)"),
    "check_tokens": _Key(_positive_int, True, "tokens of the copy checks (chapter 01)"),
    "properties_single_tokens": _Key(_positive_int, True, "tokens of the single model's statistics (chapter 02)"),
    "properties_single_vocab_neurons": _Key(_optional(_positive_int), True,
                                            "neurons per layer with W_U moments in the single model's statistics "
                                            "(chapter 02; null: all)"),
    "explain_tokens": _Key(_positive_int, True, "tokens of the reference model's variance reduction (chapter 03)"),
    "explain_single_tokens": _Key(_positive_int, True, "tokens of the single model's variance reduction (chapter 03)"),
    "explain_min_positive": _Key(_positive_int, True, "positive (and negative) tokens a label needs (chapter 03)"),
    "conditioning_tokens": _Key(_positive_int, True, "tokens of the next-token conditioning (chapter 04)"),
    "conditioning_single_tokens": _Key(_positive_int, True, "the single model's tokens of the same (chapter 04)"),
    "vocab_single_neurons": _Key(_optional(_positive_int), True,
                                 "neurons per layer of the single model's W_U moments (chapter 04; null: all)"),
    "entropy_rows": _Key(_positive_int, True, "token rows of the entropy interventions (chapter 05)"),
    "entropy_single_ctx": _Key(_positive_int, True, "tokens per row of the single model's entropy runs (chapter 05)"),
    "entropy_single_rows": _Key(_positive_int, True, "rows of the single model's entropy interventions (chapter 05)"),
    "entropy_single_random": _Key(_optional(_positive_int), True,
                                  "random neurons of its entropy baseline (chapter 05; null: the paper's)"),
    "entropy_single_random_rows": _Key(_positive_int, True,
                                       "other rows of the single model's random neurons (chapter 05)"),
    "entropy_single_random_ctx": _Key(_positive_int, True, "tokens per row of those rows (chapter 05)"),
    "entropy_random_grid": _Key(_grid, True,
                                "grid points of the single model's and the control's random neurons (chapter 05)"),
    "attention_tokens": _Key(_positive_int, True, "tokens of the path ablation (chapter 06)"),
    "attention_top_pairs": _Key(_positive_int, True, "pairs ablated at each end of h_n (chapter 06)"),
    "attention_random_pairs": _Key(_positive_int, True, "random pairs ablated (chapter 06)"),
    "attention_single_tokens": _Key(_positive_int, True, "the single model's tokens of the path ablation (chapter 06)"),
    "attention_single_top_pairs": _Key(_positive_int, True,
                                       "the single and second models' pairs at each end (chapter 06)"),
    "attention_single_random_pairs": _Key(_positive_int, True,
                                          "the single and second models' random pairs (chapter 06)"),
    "bos_rows": _Key(_positive_int, True, "token rows of the single model's BOS value norms (chapter 06)"),
    "bos_ctx": _Key(_positive_int, True, "tokens of each row of the BOS value norms (chapter 06)"),
    "second_tokens": _Key(_positive_int, True,
                              "the second model's tokens of its signs and path ablation (chapter 06)"),
    "second_bos_rows": _Key(_positive_int, True, "the first of the bos_rows its BOS value norms use (chapter 06)"),
    "second_model": _Key(_optional(_str), False,
                             "a second real model beside the single model, chapter 06 (null: none)"),
    "preset": _Key(_str, False, "the preset's name"),
    "n_seeds": _Key(_optional(_int), False, "members of the embedded family"),
    "corpus": _Key(None, False, "the embedded corpus block (CORPUS_KEYS)"),
    "embedded": _Key(None, False, "the embedded family block (EMBEDDED_KEYS)"),
}
BLOCKS: dict[str, dict[str, _Key]] = {"corpus": CORPUS_KEYS, "embedded": EMBEDDED_KEYS}
KEYS: tuple[str, ...] = tuple(TOP_KEYS)

# Sizes that must not exceed another key: {key: its bound}. A token count is a prefix of the token
# table its bound sizes; the other two are parts of rows (`entropy_single_random_ctx`) and of the
# BOS rows (`second_bos_rows`). A file that breaks one is an error; an override that lowers a
# bound lowers with it the keys it leaves as they were (`_apply_overrides`).
SUBSAMPLES: dict[str, str] = {
    "control_loss_tokens": "n_tokens",
    "context_tokens": "n_tokens_aux",
    "check_tokens": "n_tokens",
    "properties_single_tokens": "n_tokens_single",
    "explain_tokens": "n_tokens",
    "explain_single_tokens": "n_tokens_single",
    "conditioning_tokens": "n_tokens",
    "conditioning_single_tokens": "n_tokens_single",
    "entropy_single_random_ctx": "entropy_single_ctx",
    "attention_tokens": "n_tokens",
    "attention_single_tokens": "n_tokens_single",
    "second_tokens": "n_tokens_single",
    "second_bos_rows": "bos_rows",
}


# ---- read-only containers (subclasses of dict and list, so json and equality work unchanged) ----

def _read_only(self, *args, **kwargs):
    raise TypeError("a preset is read-only: pass overrides to load_preset(name, key=value) or use params.replace(key=value)")


class FrozenDict(dict):
    """A dict that refuses changes; JSON-serialisable and equal to the dict with the same items."""

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __reduce__(self):
        return (type(self), (dict(self),))


class FrozenList(list):
    """A list that refuses changes; JSON-serialisable and equal to the list with the same items."""

    __setitem__ = __delitem__ = append = extend = insert = remove = pop = clear = sort = reverse = _read_only
    __iadd__ = __imul__ = _read_only

    def __reduce__(self):
        return (type(self), (list(self),))


def _thaw(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _thaw(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_thaw(x) for x in v]
    return v


# ---- key checks with the closest valid key ----

def _where(path: Path | None) -> str:
    if path is None:
        return "preset"
    try:
        return str(Path(path).resolve().relative_to(repo_root()))
    except ValueError:
        return str(path)


def _unknown_key_message(key: Any, valid: Mapping[str, Any], prefix: str) -> str:
    if isinstance(key, str) and key in RENAMED:
        return f"{prefix} `{key}`: {RENAMED[key]}"
    close = difflib.get_close_matches(str(key), list(valid), n=1, cutoff=0.6)
    hint = f" (did you mean `{close[0]}`?)" if close else ""
    return f"{prefix} `{key}`{hint}; valid keys: {', '.join(valid)}"


def _key_problems(data: Mapping, schema: Mapping[str, _Key], block: str | None) -> list[str]:
    what = f"unknown key in the `{block}` block:" if block else "unknown key"
    problems = [_unknown_key_message(k, schema, what) for k in data if k not in schema]
    missing = [k for k, key in schema.items() if key.required and k not in data]
    problems += [f"missing required key `{k}`" + (f" in the `{block}` block" if block else "") + f" ({schema[k].doc})"
                 for k in missing]
    return problems


def _check_block(value: Any, name: str, schema: Mapping[str, _Key]) -> tuple[Any, list[str]]:
    """(the block as a FrozenDict with checked values, the problems found)."""
    if not isinstance(value, Mapping):
        return value, [f"`{name}` must be a mapping of {', '.join(schema)}, got {value!r}"]
    problems = _key_problems(value, schema, name)
    out = {}
    for k, v in value.items():
        if k in schema:
            try:
                out[k] = schema[k].check(v)
            except _Bad as e:
                problems.append(f"`{name}.{k}` must be {e}, got {v!r}")
    return FrozenDict(out), problems


def _too_large(key: str, value: int, bound: str, limit: int) -> str:
    return (f"`{key}` ({value}) is larger than `{bound}` ({limit}), the size it is a part of: "
            f"set `{key}` to at most {limit}, or raise `{bound}`")


def _build(data: Mapping, path: Path | None, where: str | None = None) -> Preset:
    problems = _key_problems(data, TOP_KEYS, None)
    if problems:
        raise PresetError(f"{where or _where(path)}: " + "; ".join(problems))
    return Preset(**data, path=path)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _apply_overrides(base: Preset, overrides: Mapping[str, Any]) -> Preset:
    given = {k: v for k, v in overrides.items() if v is not None}
    if not given:
        return base
    if "preset" in given:
        raise PresetError("`preset` names the file to load; choose another file instead of overriding it")
    unknown = [_unknown_key_message(k, TOP_KEYS, "unknown override") for k in given if k not in TOP_KEYS]
    if unknown:
        raise PresetError(f"{_where(base.path)}: " + "; ".join(unknown))
    data = {k: getattr(base, k) for k in base}
    data.update(given)  # an override replaces the whole value, blocks included
    # a size the overrides leave as it was follows a bound they lower below it (`-p n_tokens 5000`
    # shortens every pass that reads a prefix of the n_tokens table); one they set is checked as given
    changed = {k for k, v in given.items() if v != getattr(base, k)}
    for key, bound in SUBSAMPLES.items():
        limit = data[bound]
        if key not in changed and bound in changed and _is_count(limit) and limit > 0 and data[key] > limit:
            data[key] = limit
    return _build(data, base.path, f"{_where(base.path)} with overrides {sorted(given)}")


# ---- files ----

ROOT_ENV = "UNIVERSAL_NEURONS_ROOT"  # set by the Colab set-up cell to the cloned repository


def published_ref(root: Path | None = None) -> str:
    """The git ref that the Colab links open and the Colab set-up cell clones: the published branch,
    `repository.branch` of `_config.yml` (the one place it is set; Jupyter Book reads it too). A
    branch and not a tag, since the branch is what is pushed with the history the book is built from."""
    root = root or repo_root()
    branch = (yaml.safe_load((root / "_config.yml").read_text()).get("repository") or {}).get("branch")
    if not branch:
        raise ValueError(f"{root / '_config.yml'} has no `repository: branch:`, the published branch that Colab opens")
    return str(branch)


def repo_root() -> Path:
    """The repository root: `$UNIVERSAL_NEURONS_ROOT` if set, else the nearest parent of this file
    (or of the cwd) holding `params/` and `_config.yml`."""
    env = os.environ.get(ROOT_ENV)
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / "params").is_dir():
            raise FileNotFoundError(f"${ROOT_ENV}={env} has no params/ folder: point it at a clone of the repository")
        return root
    for start in (Path(__file__).resolve(), Path.cwd().resolve()):
        for parent in (start, *start.parents):
            if (parent / "params").is_dir() and (parent / "_config.yml").is_file():
                return parent
    return Path.cwd().resolve()


def params_dir() -> Path:
    return repo_root() / "params"


def available_presets() -> list[str]:
    return sorted(p.stem for p in params_dir().glob("*.yaml"))


def preset_path(name_or_path: str | os.PathLike) -> Path:
    """Resolve a preset name (`smoke`) or a path (`params/smoke.yaml`) to an existing file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if p.is_file():
            return p
        if (repo_root() / p).is_file():
            return repo_root() / p
        raise FileNotFoundError(f"preset file {str(p)!r} does not exist")
    candidate = params_dir() / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"unknown preset {str(name_or_path)!r}; known presets: {', '.join(available_presets())} "
        f"(or pass a path to a .yaml file)"
    )


def load_preset(name_or_path: str | os.PathLike, **overrides: Any) -> Preset:
    """Read and check `params/<name>.yaml` (or a .yaml path), then apply `overrides`.

    An override of None keeps the preset's value (so optional notebook and command-line parameters
    can be passed straight through); any other value replaces it, a block as a whole. Raises
    `PresetError` naming the file and the key for an unknown key (with the closest valid one), a
    missing required key or a value of the wrong type, and FileNotFoundError for an unknown preset.
    """
    path = preset_path(name_or_path)
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise PresetError(f"{_where(path)} must be a YAML mapping of parameter names to values")
    named = data.get("preset")
    if named is not None and not isinstance(named, str):
        raise PresetError(f"{_where(path)}: `preset` must be the file's name, got {named!r}")
    if named is None:
        data["preset"] = path.stem
    else:
        try:
            same = preset_path(named).resolve() == path.resolve()
        except FileNotFoundError:
            same = False
        if not same:
            raise PresetError(f"{_where(path)} says `preset: {named}`, which is not this file: set `preset: {path.stem}` "
                              f"(papermill -f injects it, and the notebook loads the file it names)")
    return _build(data, path).replace(**overrides)


def notebook_preset(namespace: Mapping[str, Any]) -> Preset:
    """The preset of a notebook run, from the notebook's variables (`globals()`).

    `namespace["preset"]` names the file; every other preset key among the variables is an
    override, None meaning "the preset's value". This is what makes both papermill forms work:
    `-p preset gpt2-small` sets the name, `-f params/gpt2-small.yaml` injects every key of the
    file (its `preset` included), and any key papermill injects reaches the preset, checked, even
    if the parameters cell does not declare it. Variables that are not data (modules, functions)
    are ignored.
    """
    if "preset" not in namespace:
        raise PresetError("the notebook's parameters cell must set `preset` (a name in params/ or a .yaml path)")
    data_types = (type(None), bool, int, float, str, list, tuple, Mapping)
    overrides = {k: namespace[k] for k in KEYS if k != "preset" and k in namespace and isinstance(namespace[k], data_types)}
    return load_preset(namespace["preset"], **overrides)


def resolve_dir(path: str | os.PathLike) -> Path:
    """A relative directory is taken relative to the repository root, so notebooks executed from
    any working directory (papermill, nbmake, Colab) share one artifacts folder."""
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = repo_root() / p
    p.mkdir(parents=True, exist_ok=True)
    return p

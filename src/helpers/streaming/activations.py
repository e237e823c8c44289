"""The one streaming driver: models run over token rows with any hooks, each batch yielded with
its token metadata, accumulators checkpointed and sharded in one place.

The paper records the post-activation of every MLP neuron (`blocks.{l}.mlp.hook_post`), over all
layers, dropping the BOS/pad and newline tokens, with the forward pass stopped before the
unembedding. `ActivationStream` generalises this: one or several models, any set of hook names
(`mlp.hook_pre`, `mlp.hook_post`, `attn.hook_pattern`, `ln_final.hook_scale`, ...), each batch with
the model ids, GPT-2 ids, positions, source labels and the valid-token mask of its tokens, and any
accumulators with `update / merge / state_dict / load_state_dict` (`StreamingPearson`,
`StreamingMoments`). Activations are kept as the model computes them (fp32 here); the accumulators
decide their own precision.

Resume is by row offset (every row holds `n_ctx` tokens, so this is a token offset): a checkpoint
records how many rows were consumed, not how many batches, so a rerun with another batch size
neither skips nor repeats rows. Under `torchrun` each rank takes a contiguous shard of the rows and
the accumulators are merged exactly on rank 0 at the end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from helpers.core.cache import load_checkpoint, save_checkpoint
from helpers.data.tokens import TokenRows, valid_token_mask

# Hooks whose activations are not one vector per token ([batch, heads, q, k]): yielded whole.
WHOLE_HOOKS = ("hook_pattern", "hook_attn_scores")


def hook_names(model, hook: str = "mlp.hook_post") -> list[str]:
    return [f"blocks.{layer}.{hook}" for layer in range(model.cfg.n_layers)]


def mlp_activations(model, tokens: torch.Tensor, mask: torch.Tensor | None = None, hook: str = "mlp.hook_post") -> torch.Tensor:
    """All-layer MLP activations of `tokens` [batch, pos] -> [valid tokens, n_layers * d_mlp] fp32.

    Layers are concatenated in order (neuron `(l, i)` is column `l * d_mlp + i`); `mask`
    [batch, pos] selects the tokens kept (all when None)."""
    names = hook_names(model, hook)
    acts = hook_activations(model, tokens, names, mask)
    return torch.cat([acts[n] for n in names], dim=-1).float()


def distributed() -> tuple[int, int, object]:
    """(rank, world size, torch.distributed or None): set up from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("CORR_BACKEND") != "gloo" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist


@torch.no_grad()
def hook_activations(model, tokens: torch.Tensor, names: Sequence[str], mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{hook name: activation} of one forward pass of `tokens` [batch, pos].

    Per-token hooks ([batch, pos, ...]) are returned at the `mask`ed tokens, `[valid tokens, ...]`
    in row-major order (all tokens when `mask` is None); attention patterns and scores
    ([batch, heads, q, k]) whole. The pass stops after the last block a hook needs."""
    wanted = set(names)
    layers = [int(n.split(".")[1]) for n in names if n.startswith("blocks.")]
    stop = max(layers) + 1 if len(layers) == len(names) else None
    _, cache = model.run_with_cache(tokens.to(model.cfg.device), names_filter=lambda n: n in wanted,
                                    stop_at_layer=stop, return_type=None)
    out = {}
    for n in names:
        a = cache[n]
        if n.endswith(WHOLE_HOOKS):
            out[n] = a
        elif mask is not None:
            out[n] = a[mask.to(a.device)]
        else:
            out[n] = a.reshape(-1, *a.shape[2:])
    return out


@dataclass
class Batch:
    """One batch of the stream. Token metadata are [batch, pos] (rows `rows` of the table);
    `acts[member][hook]` are `[valid tokens, ...]` in the order of `mask.nonzero()` (see
    `hook_activations`), so `valid(t)` of any metadata tensor lines up with them."""

    index: int
    rows: slice
    ids: torch.Tensor
    gpt2_ids: torch.Tensor | None
    positions: torch.Tensor
    labels: torch.Tensor | None
    mask: torch.Tensor
    acts: dict[str, dict[str, torch.Tensor]]

    @property
    def n_tokens(self) -> int:
        return int(self.mask.sum())

    def valid(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Metadata `t` [batch, pos] at the valid tokens: [valid tokens], aligned with `acts`."""
        return None if t is None else t[self.mask]

    def concat(self, member: str, names: Sequence[str]) -> torch.Tensor:
        """`member`'s activations of `names` side by side: [valid tokens, sum of widths]."""
        return torch.cat([self.acts[member][n] for n in names], dim=1)


class ActivationStream:
    """Stream `models` over `rows` with `hooks`, feeding accumulators; checkpointed and sharded.

    `models` {member: HookedTransformer}; `rows` TokenRows (or a [rows, n_ctx] id tensor);
    `hooks` hook names for every model, or {member: names}; `drop_ids` the tokens left out of the
    valid-token mask (BOS/pad, newline). `accumulators()` builds this pass's accumulators, a dict
    {name: object with update / merge / state_dict / load_state_dict}; the caller updates them in
    the loop:

        stream = ActivationStream(models, rows, names, 32, drop_ids, make_accs, identity, ckpt)
        for batch in stream:
            stream.accs["post"].update(batch.concat("a", names))
        accs = stream.merged()          # rank 0: every rank's data; other ranks: None

    With `checkpoint`, the accumulators, the rows consumed, the valid-token count and `extra` (a
    dict the caller may fill, e.g. snapshots) are saved every `checkpoint_every` valid tokens (and
    at the end with `save_at_end`), together with `identity` (what determines the result) and this
    process's shard. A rerun resumes from the row after the last one saved, whatever its batch
    size; a checkpoint of another identity or shard, or a damaged one, is reported in one line and
    not resumed.

    `split_at`: row counts at which a batch must end (a batch never straddles one), so a caller
    can snapshot its accumulators over exactly the first `k` rows in the same pass
    (`batch.rows.stop == k`).
    """

    def __init__(self, models: Mapping, rows: TokenRows | torch.Tensor, hooks: Sequence[str] | Mapping[str, Sequence[str]],
                 batch_size: int, drop_ids: Sequence[int], accumulators: Callable[[], dict], identity: dict | None = None,
                 checkpoint: str | Path | None = None, checkpoint_every: int = 200_000, save_at_end: bool = False,
                 desc: str = "activations", verbose: bool = True, device: str | torch.device = "cpu",
                 split_at: Sequence[int] = ()):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.models = dict(models)
        self.rows = TokenRows.of(rows)
        self.hooks = {m: list(hooks[m] if isinstance(hooks, Mapping) else hooks) for m in self.models}
        self.batch_size, self.drop_ids = int(batch_size), [int(t) for t in drop_ids]
        self.make_accumulators, self.device = accumulators, device
        self.rank, self.world, self.dist = distributed()
        n = len(self.rows)
        self.lo, self.hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        self.identity = {**(identity or {}), "shard": [self.lo, self.hi], "world": self.world}
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.checkpoint_every, self.save_at_end = int(checkpoint_every), save_at_end
        self.desc, self.verbose = desc, verbose
        self.split_at = sorted({int(k) for k in split_at})
        self.accs = accumulators()
        self.rows_done, self.n_tokens, self.extra = 0, 0, {}
        self.resumed = False
        if self.checkpoint is not None:
            st = load_checkpoint(self.checkpoint, self.identity, map_location=device)
            if st is not None:
                for k, acc in self.accs.items():
                    acc.load_state_dict(st["accumulators"][k])
                self.rows_done, self.n_tokens, self.extra = int(st["rows_done"]), int(st["n_tokens"]), st["extra"]
                self.resumed = True
                if verbose:
                    print(f"rank {self.rank}: resuming {desc} at row {self.lo + self.rows_done:,} of "
                          f"[{self.lo:,}, {self.hi:,}) ({self.n_tokens:,} tokens)")

    @property
    def done(self) -> bool:
        return self.lo + self.rows_done >= self.hi

    def save(self) -> None:
        if self.checkpoint is not None:
            save_checkpoint(self.checkpoint, self.identity, {
                "accumulators": {k: a.state_dict() for k, a in self.accs.items()}, "rows_done": self.rows_done,
                "n_tokens": self.n_tokens, "extra": self.extra, "tokens_done": self.rows_done * self.rows.n_ctx})

    def __iter__(self) -> Iterator[Batch]:
        from tqdm.auto import tqdm

        r = self.rows
        bar = tqdm(total=self.hi - self.lo, initial=self.rows_done, desc=self.desc, unit="row",
                   disable=not self.verbose or self.rank != 0)
        t0, tok0, last = time.time(), self.n_tokens, self.n_tokens
        pos = torch.arange(r.n_ctx)
        index = 0
        for sl in self._slices(self.lo + self.rows_done):
            ids = r.ids[sl]
            mask = valid_token_mask(ids, self.drop_ids)
            acts = {m: hook_activations(model, ids, self.hooks[m], mask) for m, model in self.models.items()}
            yield Batch(index, sl, ids, None if r.gpt2_ids is None else r.gpt2_ids[sl], pos.expand(len(ids), -1),
                        None if r.labels is None else r.labels[sl], mask, acts)
            index += 1
            self.rows_done += sl.stop - sl.start
            self.n_tokens += int(mask.sum())
            bar.update(sl.stop - sl.start)
            bar.set_postfix(tok_s=f"{(self.n_tokens - tok0) / max(time.time() - t0, 1e-9):,.0f}")
            if self.n_tokens - last >= self.checkpoint_every and not self.done:
                self.save()
                last = self.n_tokens
        bar.close()
        if self.save_at_end:
            self.save()

    def _slices(self, start: int) -> Iterator[slice]:
        """Batches of `batch_size` rows from `start` to the shard's end, cut at `split_at`."""
        while start < self.hi:
            stop = min(start + self.batch_size, self.hi)
            stop = min([k for k in self.split_at if start < k < stop] or [stop])
            yield slice(start, stop)
            start = stop

    def merged(self) -> dict | None:
        """The accumulators over every rank's rows (exact merges) on rank 0; None on other ranks.
        `n_tokens` becomes the total."""
        if self.dist is None:
            return self.accs
        states = [None] * self.world
        self.dist.all_gather_object(states, {"accs": {k: a.state_dict() for k, a in self.accs.items()}, "n": self.n_tokens})
        if self.rank != 0:
            return None
        for st in states[1:]:
            others = self.make_accumulators()
            for k, acc in self.accs.items():
                others[k].load_state_dict(st["accs"][k])
                acc.merge(others[k])
            self.n_tokens += st["n"]
        return self.accs

    def discard_checkpoint(self) -> None:
        if self.checkpoint is not None and self.checkpoint.is_file():
            self.checkpoint.unlink()


@torch.no_grad()
def top_activating_contexts(model, rows: torch.Tensor, layer: int, neuron: int, k: int = 5, window: int = 24,
                            batch_size: int = 32, hook: str = "mlp.hook_post") -> list[dict]:
    """The `k` tokens of `rows` where neuron `(layer, neuron)` is most active, each with the
    `window` tokens before it and their activations (for circuitsvis).

    Returns dicts with `row`, `pos`, `activation`, `tokens` [window+1 ids], `acts` [window+1].
    """
    name = f"blocks.{layer}.{hook}"
    per_batch = []
    for i in range(0, len(rows), batch_size):
        tokens = rows[i : i + batch_size].to(model.cfg.device)
        _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == name, stop_at_layer=layer + 1, return_type=None)
        per_batch.append(cache[name][..., neuron].float().cpu())
    acts = torch.cat(per_batch)  # [rows, pos]
    acts[:, 0] = float("-inf")  # BOS
    flat = acts.flatten().topk(k)
    out = []
    for val, idx in zip(flat.values.tolist(), flat.indices.tolist()):
        r, p = divmod(idx, acts.shape[1])
        lo = max(1, p - window)
        out.append({"row": r, "pos": p, "activation": val, "tokens": rows[r, lo : p + 1].tolist(),
                    "acts": acts[r, lo : p + 1].tolist()})
    return out

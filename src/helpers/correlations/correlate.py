"""Which neurons are universal: one data pass that correlates a reference model with every other
seed of its family and with a rotated baseline of each (paper §2, eqs. 2-3).

For every neuron `i` of the reference model and each other member `m`:
- `max_corr_m(i)`   = max over all neurons `j` of all layers of `m` of Pearson(v_i, v_j);
- `baseline_m(i)`   = the same max against `(R_l V_l)_j`, `V_l` the activations of layer `l` of `m`
                      and `R_l` a **seeded** random orthogonal matrix per layer (default) or the
                      paper's row-normalised Gaussian matrix (`baseline="gaussian"`);
- `excess_corr(i)`  = mean_m max_corr_m(i) - mean_m baseline_m(i); universal if > `threshold` (0.5).

All comparison models share one accumulator (their activations concatenated), so each batch costs
one matrix product. The baselines are not streamed: a correlation with `R_l V_l` is a linear
function of the correlation with `V_l` and of `V_l`'s own d_mlp x d_mlp covariance
(`helpers.correlations.pearson.mixed_correlation`), so one small covariance per layer of each comparison
model replaces a second full-width product and the per-batch rotation (for GPT2-small, about half
the work of the paper's pair of runs; for the embedded family, 40%). The pass runs on the
streaming driver (`helpers.streaming.activations.ActivationStream`): accumulators checkpoint every
`checkpoint_every` tokens with the run's identity, a restarted run resumes at the next row whatever
its batch size, and under `torchrun` each rank takes a contiguous shard of the rows and the
statistics are merged exactly at the end. The run is a content-keyed result
(`helpers.core.cache.cached_result`), returned as such: `.table("universality")`, the
`.table("convergence")` snapshots, `.meta` the run record, `.path` its folder.

Command line: `python -m helpers.correlations.correlate --preset default` (see `--help`).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.core.cache import (Result, atomic_torch_save, atomic_write_csv, atomic_write_parquet, cached_result,
                                run_cli, write_json)
from helpers.core.cli import preset_from_args, preset_parser
from helpers.correlations.pearson import (DEFAULT_BYTES_PER_ELEM, gaussian_rotation, global_to_layer_neuron,
                                          max_correlation, mixed_correlation, plan_blocks, random_rotation)
from helpers.data.tokens import TokenRows
from helpers.models.families import load_family, short_name
from helpers.streaming.accumulators import StreamingPearson
from helpers.streaming.activations import ActivationStream, distributed, hook_names


def baseline_seed(seed: int, member: str, layer: int) -> int:
    h = hashlib.sha256(f"{seed}:{member}:{layer}".encode()).digest()
    return int.from_bytes(h[:6], "big")


def baseline_matrices(member: str, n_layers: int, d_mlp: int, seed: int, kind: str = "rotation", device="cpu") -> list[torch.Tensor]:
    """One `[d_mlp, d_mlp]` baseline matrix per layer of `member`, reproducible from `seed`."""
    make = {"rotation": random_rotation, "gaussian": gaussian_rotation}.get(kind)
    if make is None:
        raise ValueError(f"unknown baseline {kind!r}: use 'rotation' (orthogonal, default) or 'gaussian' (the paper's)")
    return [make(d_mlp, baseline_seed(seed, member, l)).to(device) for l in range(n_layers)]


CODE_VERSION = 3  # bump when a change to this module changes its tables
STATE_FILE = "state_block{block}_rank{rank}.pt"


def correlation_identity(family, n_tokens: int, reference: str | None = None, baseline: str = "rotation", seed: int = 0,
                         precision: str = "fp32", threshold: float = 0.5, rows: TokenRows | torch.Tensor | None = None) -> dict:
    """Everything that determines a correlation table, as content: the members' weights
    (`family.identity`), the token rows' sha256 and shape, the dropped tokens, the reference, the
    baseline and its seed, the precision, the threshold and the code version. No path, no batch
    size (the pass resumes by row offset, so the batch size does not change what is computed)."""
    rows = TokenRows.of(rows) if rows is not None else family.token_table(n_tokens)
    return {"code_version": CODE_VERSION, "family": family.name, "weights": family.identity, "members": list(family.members),
            "reference": reference or family.reference, "rows_sha256": rows.sha256, "rows_shape": list(rows.ids.shape),
            "n_tokens": int(n_tokens), "drop_ids": [int(t) for t in family.codec.drop_ids], "baseline": baseline,
            "baseline_seed": int(seed), "precision": precision, "threshold": float(threshold)}


def correlate_family(family, n_tokens: int, out_dir: str | Path | None = None, reference: str | None = None,
                     batch_size: int = 32, device: str = "cpu", precision: str = "fp32",
                     memory_budget_gb: float = 8.0, checkpoint_every: int = 200_000, baseline: str = "rotation",
                     seed: int = 0, threshold: float = 0.5, n_snapshots: int = 4, rows: torch.Tensor | None = None,
                     verbose: bool = True, artifacts_dir: str | Path | None = None) -> Result:
    """Correlate `family`'s reference member with every other member and its baseline; returns the
    cached result: `.table("universality")` the per-neuron table (also saved as `.csv`),
    `.table("convergence")` the same statistics part-way through the pass, `.meta` the run record
    (`run.json`), `.path` its folder: `out_dir`, else `<artifacts_dir>/correlations/<family>-<key>`
    (`key` a hash of `correlation_identity`, content only, so a moved checkout finds it).

    A finished run made with the same inputs is loaded (its files checked); one made with other
    inputs is refused (IdentityMismatch names the fields); an interrupted one resumes from its
    checkpoint, whatever the batch size. The token rows and the identity are computed once here."""
    if out_dir is None and artifacts_dir is None:
        raise ValueError("correlate_family needs the artifacts folder (artifacts_dir) or an explicit out_dir")
    reference = reference or family.reference
    others = [m for m in family.members if m != reference]
    if not others:
        raise ValueError(f"family {family.name!r} has one member: correlations need at least two seeds")
    rows = TokenRows.of(rows) if rows is not None else family.token_table(n_tokens)
    identity = correlation_identity(family, n_tokens, reference, baseline, seed, precision, threshold, rows)

    def compute(out: Path) -> dict | None:
        return _correlate(family, rows, identity, out, reference, others, batch_size, device, precision, memory_budget_gb,
                          checkpoint_every, baseline, seed, threshold, n_snapshots, verbose)

    return cached_result("correlations", identity, compute, root=artifacts_dir, folder=out_dir,
                         prefix=family.name)


def _correlate(family, rows: TokenRows, identity: dict, out: Path, reference: str, others: list[str], batch_size: int,
               device: str, precision: str, memory_budget_gb: float, checkpoint_every: int, baseline: str, seed: int,
               threshold: float, n_snapshots: int, verbose: bool) -> dict | None:
    t_start = time.time()
    models = {m: family.load(m) for m in [reference, *others]}
    ref_cfg = models[reference].cfg
    n_a = ref_cfg.n_layers * ref_cfg.d_mlp
    names = {m: hook_names(models[m]) for m in models}
    sizes = {m: [models[m].cfg.d_mlp] * models[m].cfg.n_layers for m in others}
    rots = {m: baseline_matrices(m, models[m].cfg.n_layers, models[m].cfg.d_mlp, seed, baseline, device) for m in others}
    n_b = sum(sum(s) for s in sizes.values())
    n_y = n_b  # raw activations of every other member (the baselines are derived from them)
    # (member, layer, columns of the concatenated targets): one covariance accumulator each.
    layer_cols, col = [], 0
    for m in others:
        for l, d in enumerate(sizes[m]):
            layer_cols.append((m, l, slice(col, col + d)))
            col += d
    gram_bytes = sum(DEFAULT_BYTES_PER_ELEM * (c.stop - c.start) ** 2 for _, _, c in layer_cols)
    if gram_bytes >= memory_budget_gb * 1e9:
        raise ValueError(f"a memory budget of {memory_budget_gb} GB cannot hold the per-layer covariances of the baseline "
                         f"({gram_bytes / 1e9:.1f} GB) and the correlations: raise memory_budget_gb (--memory-budget-gb)")
    n_rows = len(rows)
    n_batches = (n_rows + batch_size - 1) // batch_size
    plan = plan_blocks(n_a, n_y, memory_budget_gb * 1e9 - gram_bytes, batch_tokens=batch_size * rows.n_ctx)
    rank, world, _ = distributed()
    if verbose and rank == 0:
        print(f"{family.name}: reference {reference} ({n_a:,} neurons) vs {others} ({n_b:,} neurons); "
              f"{baseline} baseline from {len(layer_cols)} per-layer covariances ({gram_bytes / 1e9:.2f} GB)")
        print(f"{n_rows:,} rows x {rows.n_ctx} tokens, {n_batches} batches, {world} process(es)")
        print(plan)
    # convergence snapshots after 1/2^k of the batches, as row counts (single-process runs)
    snap_rows = sorted({min(n_rows, max(1, round(n_batches * 2.0 ** (-(n_snapshots - 1 - i)))) * batch_size)
                        for i in range(n_snapshots)})

    def summarize(acc: StreamingPearson, grams: list[StreamingPearson]) -> dict:
        corr = acc.correlation()
        res, col = {}, 0
        for m in others:
            k = sum(sizes[m])
            v, idx = max_correlation(corr[:, col : col + k])
            layer, neuron = global_to_layer_neuron(idx.cpu(), sizes[m])
            res[m] = {"max": v.cpu(), "layer": layer, "neuron": neuron, "baseline": torch.full_like(v.cpu(), float("nan"))}
            col += k
        del corr
        for (m, l, cols), g in zip(layer_cols, grams):
            v = max_correlation(mixed_correlation(acc, cols, g, rots[m][l]))[0].cpu()
            res[m]["baseline"] = torch.fmax(res[m]["baseline"], v)  # max over layers; NaN only if all are
        return res

    blocks, snapshots, dead = [], [], torch.zeros(n_a, dtype=torch.bool)
    n_valid = 0
    for bi, sl in enumerate(plan.row_slices()):

        def accumulators(sl=sl) -> dict:
            accs = {"cross": StreamingPearson(sl.stop - sl.start, n_y, device=device, precision=precision)}
            for i, (_, _, c) in enumerate(layer_cols):
                accs[f"gram{i}"] = StreamingPearson(c.stop - c.start, c.stop - c.start, device=device, precision=precision)
            return accs

        stream = ActivationStream(models, rows, names, batch_size, family.codec.drop_ids, accumulators,
                                  {**identity, "block": [sl.start, sl.stop]},
                                  out / STATE_FILE.format(block=bi, rank=rank), checkpoint_every,
                                  desc=f"correlations block {bi + 1}/{plan.n_blocks}", verbose=verbose, device=device)
        acc = stream.accs["cross"]
        grams = [stream.accs[f"gram{i}"] for i in range(len(layer_cols))]
        block_snaps = stream.extra.setdefault("snapshots", [])
        pending = [t for t in snap_rows if t > stream.rows_done]
        for batch in stream:
            y = torch.cat([batch.acts[m][n] for m in others for n in names[m]], dim=1)
            acc.update(batch.concat(reference, names[reference])[:, sl], y)
            for g, (_, _, cols) in zip(grams, layer_cols):
                yl = y[:, cols]
                g.update(yl, yl)
            stop = batch.rows.stop
            if world == 1 and pending and stop >= pending[0] and stop < n_rows:
                block_snaps.append({"tokens": acc.n_tokens, "summary": summarize(acc, grams)})
            while pending and pending[0] <= stop:
                pending.pop(0)
        merged = stream.merged()
        if merged is not None:
            acc, grams = merged["cross"], [merged[f"gram{i}"] for i in range(len(layer_cols))]
            blocks.append((sl, summarize(acc, grams)))
            keep_accumulators(out, bi, sl, acc, grams, layer_cols)
            dead[sl] = acc.dead_a().cpu()
            n_valid = acc.n_tokens
            snapshots.append((sl, block_snaps))
        del acc, grams, stream, merged
    if rank != 0:
        return None

    def assemble(parts: list[tuple[slice, dict]]) -> dict:
        full = {m: {k: torch.full((n_a,), float("nan")) if k in ("max", "baseline") else torch.full((n_a,), -1, dtype=torch.long)
                    for k in ("max", "baseline", "layer", "neuron")} for m in others}
        for sl, s in parts:
            for m in others:
                for k in full[m]:
                    full[m][k][sl] = s[m][k]
        return full

    table = universality_table(assemble(blocks), others, ref_cfg.n_layers, ref_cfg.d_mlp, dead, threshold)
    # convergence: the same statistics at earlier token counts (single-process runs)
    conv = []
    if snapshots and all(len(s) == len(snapshots[0][1]) for _, s in snapshots) and snapshots[0][1]:
        for i in range(len(snapshots[0][1])):
            part = [(sl, snaps[i]["summary"]) for sl, snaps in snapshots]
            t = universality_table(assemble(part), others, ref_cfg.n_layers, ref_cfg.d_mlp, dead, threshold)
            t["tokens"] = snapshots[0][1][i]["tokens"]
            conv.append(t[["layer", "neuron", "tokens", "mean_corr", "mean_baseline", "excess_corr", "is_universal"]])
    final = table[["layer", "neuron", "mean_corr", "mean_baseline", "excess_corr", "is_universal"]].assign(tokens=n_valid)
    run = {"family": family.name, "reference": reference, "others": others, "n_rows": n_rows, "n_ctx": rows.n_ctx,
           "n_valid_tokens": n_valid, "baseline": baseline, "baseline_seed": seed, "precision": precision,
           "threshold": threshold, "n_dead": int(dead.sum()), "plan": str(plan), "world_size": world,
           "batch_size": batch_size, "seconds": round(time.time() - t_start, 1)}
    atomic_write_parquet(table, out / "universality.parquet")
    atomic_write_csv(table, out / "universality.csv")
    atomic_write_parquet(pd.concat(conv + [final]), out / "convergence.parquet")
    write_json(out / "run.json", run)
    for f in out.glob("state_block*_rank*.pt"):
        f.unlink()
    return run


def universality_table(res: dict, others: list[str], n_layers: int, d_mlp: int, dead: torch.Tensor, threshold: float = 0.5) -> pd.DataFrame:
    """The per-neuron table (paper §2): one row per neuron of the reference model."""
    n = n_layers * d_mlp
    df = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), d_mlp), "neuron": np.tile(np.arange(d_mlp), n_layers)})
    for m in others:
        s = short_name(m)
        df[f"max_corr_{s}"] = res[m]["max"].double().numpy()
        df[f"match_layer_{s}"] = res[m]["layer"].numpy()
        df[f"match_neuron_{s}"] = res[m]["neuron"].numpy()
        df[f"baseline_{s}"] = res[m]["baseline"].double().numpy()
    mc = df[[f"max_corr_{short_name(m)}" for m in others]].to_numpy()
    mb = df[[f"baseline_{short_name(m)}" for m in others]].to_numpy()
    with np.errstate(all="ignore"):
        df["mean_corr"], df["min_corr"], df["max_corr"] = mc.mean(1), mc.min(1), mc.max(1)
        df["mean_baseline"], df["min_baseline"], df["max_baseline"] = mb.mean(1), mb.min(1), mb.max(1)
    df["excess_corr"] = df["mean_corr"] - df["mean_baseline"]
    df["is_universal"] = (df["excess_corr"] > threshold).fillna(False).astype(bool)
    df["is_dead"] = dead.numpy()[:n]
    assert len(df) == n
    return df


# ------------------------------------------------------------------ kept accumulators
# The finished run's accumulators (the reference block against every comparison neuron, and one
# covariance per comparison layer) are kept beside the table when they are small, so that other
# baselines (new rotations, the Gaussian variant) and the layers' spectra can be derived later
# without another pass over the tokens (`helpers.correlations.baselines`).
KEEP_ACCUMULATORS_BYTES = 512 * 2**20


def keep_accumulators(out: Path, block: int, rows: slice, acc: StreamingPearson, grams: list[StreamingPearson],
                      layer_cols: list[tuple[str, int, slice]], max_bytes: int = KEEP_ACCUMULATORS_BYTES) -> Path | None:
    """Save `out/accumulators_block{block}.pt` (fp64 sums; the fp32 block is flushed first) unless
    the cross-product sums exceed `max_bytes`. Returns the path, or None when not kept."""
    if acc.n_a * acc.n_b * 8 > max_bytes:
        return None
    acc.flush()
    for g in grams:
        g.flush()

    def lean(a: StreamingPearson) -> dict:
        st = dict(a.state_dict())
        st["block"] = None  # all zeros after the flush; rebuilt on load
        return st

    path = Path(out) / f"accumulators_block{block}.pt"
    atomic_torch_save({"rows": (rows.start, rows.stop), "acc": lean(acc), "grams": [lean(g) for g in grams],
                       "layer_cols": [(m, l, (c.start, c.stop)) for m, l, c in layer_cols]}, path)
    return path


def main(argv: list[str] | None = None) -> None:
    ap = preset_parser(
        "Correlate a reference model with the other seeds of its family (paper §2). The family, token count, "
        "batch size, reference, baseline, baseline seed, threshold and device come from the preset unless a flag "
        "overrides them.",
        ["family", "n_tokens", "reference", "device", "baseline", "baseline_seed", "threshold", "batch_size"])
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--memory-budget-gb", type=float, default=8.0)
    ap.add_argument("--checkpoint-every", type=int, default=200_000, help="tokens between accumulator checkpoints")
    ap.add_argument("--out", default=None, help="output folder (default: a cache folder keyed by the run's inputs); a "
                                                "finished run there made with other inputs is refused")
    ap.add_argument("--debug", action="store_true", help="show tracebacks (also HELPERS_DEBUG=1)")
    args = ap.parse_args(argv)
    params = preset_from_args(args)
    fam = load_family(params.family, params, device=params.device)
    res = correlate_family(fam, params.n_tokens, args.out, fam.member(params.reference), params.batch_size,
                           params.device, args.precision, args.memory_budget_gb, args.checkpoint_every,
                           params.baseline, params.baseline_seed, params.threshold,
                           artifacts_dir=params.artifacts_path)
    if res.files:
        table = res.table("universality")
        print(f"{res.path}: {int(table.is_universal.sum())} of {len(table)} neurons universal (threshold "
              f"{params.threshold}); excess correlation median {table.excess_corr.median():.3f}, 99th percentile "
              f"{table.excess_corr.quantile(0.99):.3f}")


if __name__ == "__main__":
    run_cli(main)

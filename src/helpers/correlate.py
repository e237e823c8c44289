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
(`helpers.correlation.mixed_correlation`), so one small covariance per layer of each comparison
model replaces a second full-width product and the per-batch rotation (for GPT2-small, about half
the work of the paper's pair of runs; for the embedded family, 40%). Accumulators checkpoint every `checkpoint_every` tokens and
a restarted run resumes; under `torchrun` each rank takes every `world`-th batch and the
statistics are merged exactly at the end.

Command line: `python -m helpers.correlate --preset default` (see `--help`).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .activations import iter_family_activations
from .artifacts import atomic_torch_save, config_hash, read_json, write_json
from .correlation import (DEFAULT_BYTES_PER_ELEM, StreamingPearson, gaussian_rotation, global_to_layer_neuron, max_correlation, mixed_correlation,
                          plan_blocks, random_rotation)


def short_name(member: str) -> str:
    """Column suffix of a member: `stanford-gpt2-small-b` -> `b`, `pythia-160m-seed1` -> `seed1`."""
    return member.rsplit("-", 1)[-1] if "-" in member else member


def baseline_seed(seed: int, member: str, layer: int) -> int:
    h = hashlib.sha256(f"{seed}:{member}:{layer}".encode()).digest()
    return int.from_bytes(h[:6], "big")


def baseline_matrices(member: str, n_layers: int, d_mlp: int, seed: int, kind: str = "rotation", device="cpu") -> list[torch.Tensor]:
    """One `[d_mlp, d_mlp]` baseline matrix per layer of `member`, reproducible from `seed`."""
    make = {"rotation": random_rotation, "gaussian": gaussian_rotation}.get(kind)
    if make is None:
        raise ValueError(f"unknown baseline {kind!r}: use 'rotation' (orthogonal, default) or 'gaussian' (the paper's)")
    return [make(d_mlp, baseline_seed(seed, member, l)).to(device) for l in range(n_layers)]


def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() and os.environ.get("CORR_BACKEND") != "gloo" else "gloo")
    return dist.get_rank(), dist.get_world_size(), dist


def correlate_family(family, n_tokens: int, out_dir: str | Path, reference: str | None = None, batch_size: int = 32,
                     device: str = "cpu", precision: str = "fp32", memory_budget_gb: float = 8.0,
                     checkpoint_every: int = 200_000, baseline: str = "rotation", seed: int = 0,
                     threshold: float = 0.5, n_snapshots: int = 4, rows: torch.Tensor | None = None,
                     verbose: bool = True) -> pd.DataFrame:
    """Correlate `family`'s reference member with every other member and its baseline; returns (and
    saves as `out_dir/universality.parquet` and `.csv`) the per-neuron table. Cached: a finished
    run in `out_dir` is loaded, an interrupted one resumes from its checkpoint."""
    from tqdm.auto import tqdm

    out = Path(out_dir)
    table_path = out / "universality.parquet"
    if table_path.is_file():
        return pd.read_parquet(table_path)
    out.mkdir(parents=True, exist_ok=True)
    rank, world, dist = _dist()
    reference = reference or family.reference
    others = [m for m in family.members if m != reference]
    if not others:
        raise ValueError(f"family {family.name!r} has one member: correlations need at least two seeds")
    models = {m: family.load(m) for m in [reference, *others]}
    ref_cfg = models[reference].cfg
    n_a = ref_cfg.n_layers * ref_cfg.d_mlp
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
    if rows is None:
        rows = family.token_rows(n_tokens)
    n_batches = (len(rows) + batch_size - 1) // batch_size
    plan = plan_blocks(n_a, n_y, memory_budget_gb * 1e9 - gram_bytes, batch_tokens=batch_size * rows.shape[1])
    if verbose and rank == 0:
        print(f"{family.name}: reference {reference} ({n_a:,} neurons) vs {others} ({n_b:,} neurons); "
              f"{baseline} baseline from {len(layer_cols)} per-layer covariances ({gram_bytes / 1e9:.2f} GB)")
        print(f"{len(rows):,} rows x {rows.shape[1]} tokens, {n_batches} batches, {world} process(es)")
        print(plan)
    snap_batches = sorted({max(1, round(n_batches * 2.0 ** (-(n_snapshots - 1 - i)))) for i in range(n_snapshots)})

    def targets(acts: dict) -> torch.Tensor:
        return torch.cat([acts[m] for m in others], dim=1)

    def new_grams() -> list[StreamingPearson]:
        return [StreamingPearson(c.stop - c.start, c.stop - c.start, device=device, precision=precision) for _, _, c in layer_cols]

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
    t_start = time.time()
    n_valid = 0
    for bi, sl in enumerate(plan.row_slices()):
        state_file = out / f"state_block{bi}_rank{rank}.pt"
        acc = StreamingPearson(sl.stop - sl.start, n_y, device=device, precision=precision)
        grams = new_grams()
        start, last_ckpt, block_snaps = 0, 0, []
        if state_file.is_file():
            st = torch.load(state_file, map_location=device, weights_only=False)
            if "grams" not in st or len(st["grams"]) != len(grams):
                raise ValueError(f"{state_file} was written by another version of helpers.correlate (it lacks the per-layer "
                                 "covariances of the baseline): delete it to start this block again")
            acc.load_state_dict(st["acc"])
            for g, gs in zip(grams, st["grams"]):
                g.load_state_dict(gs)
            start, block_snaps = st["next_batch"], st["snapshots"]
            if verbose:
                print(f"rank {rank}: resuming block {bi} at batch {start}/{n_batches} ({acc.n_tokens:,} tokens)")
        bar = tqdm(total=n_batches, initial=start, desc=f"correlations block {bi + 1}/{plan.n_blocks}", unit="batch",
                   disable=not verbose or rank != 0)
        t0, tok0 = time.time(), acc.n_tokens
        for b, acts in iter_family_activations(models, rows, batch_size, family.codec.drop_ids, start, rank, world):
            y = targets(acts)
            acc.update(acts[reference][:, sl], y)
            for g, (_, _, cols) in zip(grams, layer_cols):
                yl = y[:, cols]
                g.update(yl, yl)
            bar.update(b + 1 - bar.n)
            bar.set_postfix(tok_s=f"{(acc.n_tokens - tok0) / max(time.time() - t0, 1e-9):,.0f}")
            if world == 1 and (b + 1) in snap_batches and b + 1 < n_batches:
                s = summarize(acc, grams)
                block_snaps.append({"tokens": acc.n_tokens, "summary": s})
            if acc.n_tokens - last_ckpt >= checkpoint_every:
                atomic_torch_save({"acc": acc.state_dict(), "grams": [g.state_dict() for g in grams], "next_batch": b + 1,
                                   "snapshots": block_snaps}, state_file)
                last_ckpt = acc.n_tokens
        bar.close()
        if dist is not None:
            states = [None] * world
            dist.all_gather_object(states, {"acc": acc.state_dict(), "grams": [g.state_dict() for g in grams]})
            if rank == 0:
                for r, st in enumerate(states):
                    if r:
                        other = StreamingPearson(sl.stop - sl.start, n_y, device=device, precision=precision)
                        other.load_state_dict(st["acc"])
                        acc.merge(other)
                        for g, gs, o in zip(grams, st["grams"], new_grams()):
                            o.load_state_dict(gs)
                            g.merge(o)
        if rank == 0:
            blocks.append((sl, summarize(acc, grams)))
            keep_accumulators(out, bi, sl, acc, grams, layer_cols)
            dead[sl] = acc.dead_a().cpu()
            n_valid = acc.n_tokens
            snapshots.append((sl, block_snaps))
        del acc, grams
    if rank != 0:
        return pd.DataFrame()

    def assemble(parts: list[tuple[slice, dict]]) -> dict:
        full = {m: {k: torch.full((n_a,), float("nan")) if k in ("max", "baseline") else torch.full((n_a,), -1, dtype=torch.long)
                    for k in ("max", "baseline", "layer", "neuron")} for m in others}
        for sl, s in parts:
            for m in others:
                for k in full[m]:
                    full[m][k][sl] = s[m][k]
        return full

    res = assemble(blocks)
    table = universality_table(res, others, ref_cfg.n_layers, ref_cfg.d_mlp, dead, threshold)
    table.to_parquet(table_path.with_suffix(".tmp.parquet"))
    table.to_csv(out / "universality.csv", index=False)
    # convergence: the same statistics at earlier token counts (single-process runs)
    conv = []
    if snapshots and all(len(s) == len(snapshots[0][1]) for _, s in snapshots) and snapshots[0][1]:
        for i in range(len(snapshots[0][1])):
            part = [(sl, snaps[i]["summary"]) for sl, snaps in snapshots]
            t = universality_table(assemble(part), others, ref_cfg.n_layers, ref_cfg.d_mlp, dead, threshold)
            t["tokens"] = snapshots[0][1][i]["tokens"]
            conv.append(t[["layer", "neuron", "tokens", "mean_corr", "mean_baseline", "excess_corr", "is_universal"]])
    final = table[["layer", "neuron", "mean_corr", "mean_baseline", "excess_corr", "is_universal"]].assign(tokens=n_valid)
    pd.concat(conv + [final]).to_parquet(out / "convergence.parquet")
    write_json(out / "run.json", {"family": family.name, "reference": reference, "others": others, "n_rows": len(rows),
                                  "n_ctx": int(rows.shape[1]), "n_valid_tokens": n_valid, "baseline": baseline,
                                  "baseline_seed": seed, "precision": precision, "threshold": threshold,
                                  "n_dead": int(dead.sum()), "plan": str(plan), "world_size": world,
                                  "seconds": round(time.time() - t_start, 1)})
    os.replace(table_path.with_suffix(".tmp.parquet"), table_path)
    for f in out.glob("state_block*_rank*.pt"):
        f.unlink()
    return table


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


def results_dir(family, n_tokens: int, artifacts_dir: str | Path, reference: str | None = None, baseline: str = "rotation",
                seed: int = 0, precision: str = "fp32", threshold: float = 0.5) -> Path:
    """Cache folder of a correlation run: keyed by everything that determines its result."""
    ident = {"family": family.name, "family_key": family.identity, "members": family.members,
             "n_tokens": int(n_tokens), "reference": reference or family.reference, "baseline": baseline, "seed": seed,
             "precision": precision, "threshold": threshold, "version": 2}
    return Path(artifacts_dir) / "correlations" / f"{family.name}-{config_hash(ident)}"


# ------------------------------------------------------------------ kept accumulators
# The finished run's accumulators (the reference block against every comparison neuron, and one
# covariance per comparison layer) are kept beside the table when they are small, so that other
# baselines (new rotations, the Gaussian variant) and the layers' spectra can be derived later
# without another pass over the tokens (`helpers.baselines`).
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
    from .families import load_family
    from .presets import load_preset, resolve_dir

    ap = argparse.ArgumentParser(description="Correlate a reference model with the other seeds of its family (paper §2).")
    ap.add_argument("--preset", default="default", help="params/<preset>.yaml (family, tokens, device, ...)")
    ap.add_argument("--family", default=None, help="overrides the preset's family (e.g. embedded-untrained)")
    ap.add_argument("--n-tokens", type=int, default=None, help="tokens of held-out text (default: the preset's n_tokens)")
    ap.add_argument("--reference", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "bf16"])
    ap.add_argument("--memory-budget-gb", type=float, default=8.0)
    ap.add_argument("--baseline", default="rotation", choices=["rotation", "gaussian"])
    ap.add_argument("--checkpoint-every", type=int, default=200_000, help="tokens between accumulator checkpoints")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--out", default=None, help="output folder (default: a cache folder keyed by the run's inputs)")
    args = ap.parse_args(argv)
    params = load_preset(args.preset)
    device = args.device or params.get("device", "cpu")
    fam = load_family(args.family or params["family"], params, device=device)
    n_tokens = args.n_tokens or int(params["n_tokens"])
    art = resolve_dir(params.get("artifacts_dir", "artifacts"))
    out = Path(args.out) if args.out else results_dir(fam, n_tokens, art, args.reference, args.baseline, params["baseline_seed"], args.precision)
    table = correlate_family(fam, n_tokens, out, args.reference, args.batch_size or int(params.get("batch_size", 32)), device,
                             args.precision, args.memory_budget_gb, args.checkpoint_every, args.baseline, params["baseline_seed"])
    if len(table):
        print(f"{out}: {int(table.is_universal.sum())} of {len(table)} neurons universal; "
              f"excess correlation median {table.excess_corr.median():.3f}, 99th percentile {table.excess_corr.quantile(0.99):.3f}")


if __name__ == "__main__":
    main()

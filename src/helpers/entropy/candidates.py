"""Entropy neurons from the weights (paper §5.2, Figs 7a-b; the null-space measure of Stolfo et al. 2024).

An entropy neuron writes a large vector (high L2 penalty ||w_in||^2 + ||w_out||^2) that the
unembedding barely reads (low variance of cos(W_U, w_out) over the vocabulary): its output lies in
the span of W_U's smallest singular directions, its "null space". It changes the residual stream's
norm, hence the final normalisation's scale, and so the temperature of the next-token distribution,
without changing which token is predicted. An anti-entropy partner writes nearly the opposite vector.

**What the neuron does to the logits.** W_U and w_out stand here for the effective unembedding and
direction of `helpers.models.effective`: `effective_unembed` (diag(g_f) W_U when the final norm keeps
its weight g_f) and the row of `output_directions` (w_out times the weight of a norm after the MLP,
as in Gemma). Without those norms (GPT-2, the embedded family, SmolLM2 with `fold_ln`) they are W_U
and w_out themselves. The L2 penalty is a property of the weights (the paper's weight-decay
quantity) and stays ||w_in||^2 + ||w_out||^2 of the raw weights.

Everything here is computed from the processed weights the families load. The exact zero direction
that weight processing creates is left out of the spectrum: folding a LayerNorm with centring makes
every column of W_U orthogonal to the all-ones direction of the residual stream, which the
LayerNorm removes anyway. RMSNorm models (SmolLM2) have no such direction. An unembedding whose
spectrum is flat (no direction read at less than half the median gain) has **no null space**: then
no null-space share is computed (NaN), rather than a share in one arbitrary smallest direction.

**Natural direction.** A neuron writes s * w_out when it acts, s the sign of its typical large
activation (`neuron_stats.SIGN_RULE`): a gated MLP's activation takes both signs, so w_out alone
does not say which way the neuron pushes. The anti-entropy partner is found, and the pair's cosine
measured, on these effective directions; the sweep runs over the neuron's own activation range,
both signs, with its natural direction as the positive side of the grid (`natural_grid`), so the
effect at the grid's top is the effect of its typical large activation, and a neuron is labelled
entropy or anti-entropy by that effect (`effect_role`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from helpers.models.effective import effective_unembed, output_directions
from helpers.properties.neuron_stats import sign_tensor, weight_statistics

EXTEND = 1.5  # the grid reaches this multiple of the neuron's quantile on each side (interventions.RANGE_QUANTILES)
MIN_OTHER = 0.17 / 6  # the least the opposite side spans, relative to the natural one: the paper's -0.17 against its 6


VOCAB_COLUMNS = ["layer", "neuron", "l2_penalty", "vocab_var", "w_out_norm"]


class _LayerView:
    """A model seen through some of its layers only (renumbered 0..), for `weight_statistics`."""

    def __init__(self, model, layers):
        import copy

        self.cfg = copy.copy(model.cfg)
        self.cfg.n_layers = len(layers)
        self.blocks = [model.blocks[l] for l in layers]
        self.W_U = model.W_U
        if hasattr(model, "ln_final"):
            self.ln_final = model.ln_final


def vocab_statistics(model, layers=None) -> pd.DataFrame:
    """Per-neuron `layer`, `neuron`, `l2_penalty` (of the raw weights), `vocab_var` (variance over
    the vocabulary of cos(W_U[:, t], w_out), of the effective direction and unembedding),
    `w_out_norm` (the norm of the effective direction: ||w_out|| without a post-MLP norm) of the
    `layers` given (default all): the one place this chapter reads the vocabulary effect
    (`neuron_stats.weight_statistics`). Restricting the layers matters for SmolLM2, where the
    all-pairs max cosines of 46k neurons take minutes."""
    layers = list(range(model.cfg.n_layers)) if layers is None else sorted(int(l) for l in layers)
    t = weight_statistics(_LayerView(model, layers))[VOCAB_COLUMNS].copy()
    t["layer"] = np.asarray(layers)[t.layer.to_numpy()]
    t["w_out_norm"] = torch.cat([output_directions(model, l).double().norm(dim=1) for l in layers]).cpu().numpy()
    return t


def w_out_matrix(model) -> torch.Tensor:
    """Every neuron's effective output direction (`output_directions`: w_out times the post-MLP
    norm's weight, w_out without one), layers in order: [n_layers * d_mlp, d_model] float64."""
    return torch.cat([output_directions(model, l).double() for l in range(model.cfg.n_layers)])


@dataclass
class Spectrum:
    """The effective unembedding's singular values `values` [d_model] (descending) and left singular
    vectors `directions`
    [d_model, d_model] (columns); `n_zero` exact zero directions (from weight processing, left out);
    `k` the number of smallest non-zero directions taken as the null space: those below `threshold`
    (`rel` x the median non-zero singular value); `flat` when none is: then k = 0, there is no null
    space, and null-space shares are NaN."""

    values: np.ndarray
    directions: torch.Tensor
    n_zero: int
    k: int
    rel: float
    threshold: float
    flat: bool

    @property
    def d(self) -> int:
        return len(self.values)

    @property
    def has_null_space(self) -> bool:
        return self.k > 0

    @property
    def null(self) -> torch.Tensor:
        """[d_model, k] the null-space directions."""
        return self.directions[:, self.d - self.n_zero - self.k: self.d - self.n_zero]

    @property
    def zero(self) -> torch.Tensor:
        return self.directions[:, self.d - self.n_zero:]

    @property
    def random_fraction(self) -> float:
        """The expected null-space fraction of a random direction: k / (d_model - n_zero); NaN without a null space."""
        return self.k / (self.d - self.n_zero) if self.k else float("nan")

    def table(self) -> pd.DataFrame:
        i = np.arange(self.d)
        kind = np.where(i >= self.d - self.n_zero, "zero (weight processing)",
                        np.where(i >= self.d - self.n_zero - self.k, "null space", "rest"))
        return pd.DataFrame({"index": i, "singular_value": self.values, "part": kind})


def unembed_spectrum(model, zero_rtol: float = 1e-3, rel: float = 0.5, k: int | None = None) -> Spectrum:
    """The spectrum of the effective unembedding [d_model, d_vocab] (`effective_unembed`: diag(g_f)
    W_U when the final norm keeps its weight g_f, W_U when it is folded) and its null-space cut-off.

    Singular values below `zero_rtol` x the largest are exact zeros of weight processing and left out.
    The null space (unless `k` is given) is the directions whose singular value is below `rel` x the
    median of the remaining ones: directions the unembedding reads at less than half its typical
    gain. A spectrum with no such direction is `flat` and has no null space (k = 0), unless `k` is given."""
    W = effective_unembed(model).double().cpu()
    U, S, _ = torch.linalg.svd(W, full_matrices=False)
    s = S.numpy()
    n_zero = int((s < zero_rtol * s.max()).sum())
    live = s[: len(s) - n_zero]
    threshold = rel * float(np.median(live))
    below = int((live < threshold).sum())
    flat = below == 0
    if k is None:
        k = below
    elif not 1 <= k < len(live):
        raise ValueError(f"k={k} outside 1..{len(live) - 1}")
    return Spectrum(s, U, n_zero, int(k), rel, threshold, flat)


def null_space_fraction(model, spectrum: Spectrum, k: int | None = None) -> np.ndarray:
    """[n_layers * d_mlp] share of ||w_out||^2 in the null space (the `k` smallest non-zero
    directions; default the spectrum's cut-off), out of ||w_out||^2 less its part in the zero
    directions, w_out the effective direction (`w_out_matrix`) and the spectrum that of the
    effective unembedding. A random direction has k / (d_model - n_zero) on average. NaN for every neuron
    when there is no null space (a flat spectrum and no `k` given)."""
    W = w_out_matrix(model)
    d, z = spectrum.d, spectrum.n_zero
    k = spectrum.k if k is None else int(k)
    if k == 0:
        return np.full(W.shape[0], np.nan)
    null = spectrum.directions[:, d - z - k: d - z]
    total = W.square().sum(1) - (W @ spectrum.zero).square().sum(1)
    return ((W @ null).square().sum(1) / total.clamp_min(1e-300)).numpy()


def entropy_table(model, spectrum: Spectrum | None = None, n_last: int = 2, layers=None) -> pd.DataFrame:
    """One row per neuron of `layers` (default all): `l2_penalty`, `vocab_var`, `w_out_norm`,
    `null_frac` (and `null_ratio`, its multiple of a random direction's), the ranks `l2_rank` (1 =
    largest L2 penalty among these neurons) and `vocab_var_rank` (1 = smallest vocabulary-effect
    variance), and `late` (in the model's last `n_last` layers, where the paper looks)."""
    spectrum = spectrum or unembed_spectrum(model)
    t = vocab_statistics(model, layers)
    t["null_frac"] = null_space_fraction(model, spectrum)[t.layer.to_numpy() * model.cfg.d_mlp + t.neuron.to_numpy()]
    t["null_ratio"] = t.null_frac / spectrum.random_fraction
    t["l2_rank"] = t.l2_penalty.rank(ascending=False, method="min").astype(int)
    t["vocab_var_rank"] = t.vocab_var.rank(ascending=True, method="min").astype(int)
    t["late"] = t.layer >= model.cfg.n_layers - n_last
    return t


def candidates(table: pd.DataFrame, k: int = 3, decile: float = 0.1) -> pd.DataFrame:
    """Entropy-neuron candidates by the paper's query, made a rule: among the late neurons whose
    vocabulary-effect variance is in the bottom `decile`, the `k` with the largest L2 penalty."""
    late = table[table.late]
    low = late[late.vocab_var <= late.vocab_var.quantile(decile)]
    return low.sort_values("l2_penalty", ascending=False).head(k)


def null_fraction_curve(model, spectrum: Spectrum, neurons, ks) -> pd.DataFrame:
    """The null-space fraction of each (layer, neuron) for each cut-off k in `ks`, beside a random
    direction's k / (d_model - n_zero): how the measure depends on the cut-off."""
    d_mlp = model.cfg.d_mlp
    out = []
    for k in ks:
        f = null_space_fraction(model, spectrum, int(k))
        for l, n in neurons:
            out.append({"layer": int(l), "neuron": int(n), "k": int(k), "null_frac": float(f[int(l) * d_mlp + int(n)]),
                        "random": int(k) / (spectrum.d - spectrum.n_zero)})
    return pd.DataFrame(out)


def random_baseline(table: pd.DataFrame, n: int = 20, seed: int = 0, decile: float = 0.1) -> pd.DataFrame:
    """The paper's random baseline: `n` late neurons drawn with `seed`, leaving out the top `decile`
    of L2 penalty and the bottom `decile` of vocabulary-effect variance (of the late neurons)."""
    late = table[table.late]
    keep = late[(late.l2_penalty < late.l2_penalty.quantile(1 - decile)) & (late.vocab_var > late.vocab_var.quantile(decile))]
    if len(keep) < n:
        raise ValueError(f"only {len(keep)} late neurons pass the baseline's exclusions; asked for {n}")
    return keep.sample(n=n, random_state=np.random.RandomState(seed)).sort_values(["layer", "neuron"])


def w_out_cosines(model, layer: int, neuron: int, late_only: int | None = 2, signs: pd.DataFrame | None = None) -> pd.DataFrame:
    """cos(s w_out of `layer.neuron`, s w_out of every other neuron), w_out the effective directions
    (`w_out_matrix`) (of the last `late_only` layers, or all):
    `layer`, `neuron`, `cos`, sorted most negative first. `signs` (layer, neuron, act_sign): each
    neuron's natural sign s (the effective directions; +1 for a neuron without a row, and for all
    when None)."""
    d_mlp = model.cfg.d_mlp
    W = w_out_matrix(model) * sign_tensor(signs, model.cfg.n_layers, d_mlp).reshape(-1, 1).double()
    u = W / W.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = (u @ u[layer * d_mlp + neuron]).numpy()
    t = pd.DataFrame({"layer": np.repeat(np.arange(model.cfg.n_layers), d_mlp), "neuron": np.tile(np.arange(d_mlp), model.cfg.n_layers),
                      "cos": cos})
    t = t[~((t.layer == layer) & (t.neuron == neuron))]
    if late_only:
        t = t[t.layer >= model.cfg.n_layers - late_only]
    return t.sort_values("cos").reset_index(drop=True)


def anti_partner(model, layer: int, neuron: int, late_only: int | None = 2, signs: pd.DataFrame | None = None) -> dict:
    """The neuron whose effective direction s w_out points most nearly opposite to `layer.neuron`'s
    (`w_out_cosines`): {layer, neuron, cos}."""
    r = w_out_cosines(model, layer, neuron, late_only, signs).iloc[0]
    return {"layer": int(r.layer), "neuron": int(r.neuron), "cos": float(r.cos)}


def unembed_cosines(model, neurons) -> pd.DataFrame:
    """cos(W_U[:, t], w_out) for every token t and each (layer, neuron) in `neurons` (Fig 7b), of the
    effective direction and the effective unembedding: long table `layer`, `neuron`, `cos`."""
    U = effective_unembed(model).double()
    U = U / U.norm(dim=0, keepdim=True).clamp_min(1e-300)
    out = []
    for l, n in neurons:
        w = output_directions(model, int(l))[int(n)].double()
        out.append(pd.DataFrame({"layer": int(l), "neuron": int(n), "cos": ((w / w.norm()) @ U).numpy()}))
    return pd.concat(out, ignore_index=True)


# ---------------------------------------------------------------------------------- one model's study
@dataclass
class Study:
    """Everything the chapter shows for one model: the weight table, its spectrum, the chosen neurons
    (`neurons`: layer, neuron, role, act_min/act_max/act_mean, act_q_lo/act_q_hi, act_sign, the
    grid's scale and other_ratio), the effective cosine of the anti-entropy partner, and the sweep."""

    name: str
    table: pd.DataFrame
    spectrum: Spectrum
    neurons: pd.DataFrame
    partner_cos: float
    sweep: pd.DataFrame
    seconds: float | None = None

    def role(self, role: str) -> pd.DataFrame:
        return self.neurons[self.neurons.role == role]


def natural_grid(ranges: pd.DataFrame, extend: float = EXTEND) -> pd.DataFrame:
    """Each neuron's sweep range from its own activations (`interventions.activation_ranges`), in
    its natural direction s = `act_sign`.

    `grid_scale`: the activation magnitude the grid's top (the paper's 6) is mapped to, `extend` x
    its quantile on its natural side (|act_q_hi| for s = +1, |act_q_lo| for s = -1); `other_ratio`:
    the opposite side's reach (`extend` x that side's quantile, 0 if it has none) over
    `grid_scale`, at least `MIN_OTHER` (the paper's -0.17 against 6), so every grid has both signs.
    Returns `ranges` with these two columns; a neuron silent on its natural side has grid_scale 0."""
    out = ranges.copy()
    s = out.act_sign.where(out.act_sign != 0, 1.0)
    nat = np.where(s > 0, out.act_q_hi, -out.act_q_lo).clip(min=0)
    other = np.where(s > 0, -out.act_q_lo, out.act_q_hi).clip(min=0)
    out["grid_scale"] = extend * nat
    out["other_ratio"] = np.maximum(np.where(nat > 0, other / np.where(nat > 0, nat, 1.0), 0.0), MIN_OTHER)
    return out


def grid_points(other_ratio: float, top: float = 6.0) -> np.ndarray:
    """The grid in natural units (`top` = the neuron's `grid_scale` in its natural direction,
    negative = the opposite side): -r top, -r top / 2, 0, 1, ..., top, with r = `other_ratio`."""
    r = float(other_ratio)
    return np.unique(np.round(np.concatenate([[-r * top, -r * top / 2, 0.0], np.arange(1.0, top + 1.0)]), 7))


def effect_role(d_entropy: float) -> str:
    """"entropy" when the neuron's typical large activation (the grid's top, natural direction)
    raises the entropy, "anti-entropy" when it lowers it."""
    return "entropy" if d_entropy > 0 else "anti-entropy"


def opposite_effects(d_top: float, d_partner: float, chance: float) -> bool:
    """The pair verdict: the two neurons move the entropy in opposite directions when each acts
    naturally (`d_*`: grid top vs 0), each by more than `chance` (the random neurons' largest |effect|)."""
    return bool(np.sign(d_top) == -np.sign(d_partner) != 0 and abs(d_top) > chance and abs(d_partner) > chance)


def study(model, name: str, model_id: str, rows, drop_ids, artifacts_dir, n_candidates: int = 2, n_random: int = 20,
          seed: int = 0, rows_random=None, random_grid=None, late_only: bool = False, batch_size: int = 4,
          random_modes: tuple[str, ...] = ("total",), partner_modes: tuple[str, ...] | None = ("total", "direct"),
          candidate_modes: tuple[str, ...] = ("total", "direct"), verbose: bool = True) -> Study:
    """Identify the entropy neurons of `model` from its weights and sweep them (Figs 7, 1f, 25).

    Candidates (`entropy.candidates`, `n_candidates`, roles "entropy" and "candidate 2", ...), the top
    candidate's anti-entropy partner ("anti-entropy", by cos of the effective directions s w_out) and
    `n_random` baseline neurons ("random", seeded with `seed`); the roles name the weight-space
    selection, the sweep's effect says what each does (`effect_role`). One activation pass over the
    last two layers on `rows` gives every late neuron's natural sign and range; each neuron's grid
    spans that range on both signs (`natural_grid`, `grid_points`: positive = its natural
    direction, 6 = `EXTEND` x its quantile there). Candidates and the partner are swept on `rows`
    in both modes; the random neurons on `rows_random` (default `rows`) in `random_modes`, on the
    grid points `random_grid` (paper units; default the whole grid). The top candidate is swept in
    `candidate_modes`, the others and the partner in `partner_modes` (None: the partner is found
    but not swept). `late_only`: the weight table
    holds the last two layers only (ranks are then among them). The sweeps are cached by content."""
    import time

    from helpers.entropy import interventions as iv
    from helpers.data.tokens import TokenRows

    t0 = time.time()
    rows = TokenRows.of(rows)
    rows_random = rows if rows_random is None else TokenRows.of(rows_random)
    sp = unembed_spectrum(model)
    late_layers = list(range(max(0, model.cfg.n_layers - 2), model.cfg.n_layers))
    table = entropy_table(model, sp, layers=late_layers if late_only else None)
    cand = candidates(table, k=n_candidates)
    top = cand.iloc[0]
    ranges = natural_grid(iv.activation_ranges(model, rows, late_layers, drop_ids, batch_size))
    partner = anti_partner(model, int(top.layer), int(top.neuron), signs=ranges)
    rand = random_baseline(table, n_random, seed)
    chosen = pd.concat([
        cand[["layer", "neuron"]].assign(role=["entropy"] + [f"candidate {i + 2}" for i in range(len(cand) - 1)]),
        pd.DataFrame([{"layer": partner["layer"], "neuron": partner["neuron"], "role": "anti-entropy"}]),
        rand[["layer", "neuron"]].assign(role="random"),
    ]).drop_duplicates(["layer", "neuron"]).reset_index(drop=True)
    chosen = chosen.merge(ranges, on=["layer", "neuron"])
    chosen = chosen[chosen.grid_scale > 0].reset_index(drop=True)

    def target(r, g, modes):
        g = np.asarray(g, dtype=np.float64)
        return iv.Target(int(r.layer), int(r.neuron), g * (r.grid_scale / 6.0) * (1.0 if r.act_sign >= 0 else -1.0), g, r.role, modes)

    modes = {"entropy": tuple(candidate_modes)}
    main = [target(r, grid_points(r.other_ratio), modes.get(r.role, partner_modes)) for r in chosen.itertuples()
            if r.role != "random" and modes.get(r.role, partner_modes)]
    base = [target(r, grid_points(r.other_ratio) if random_grid is None else random_grid, tuple(random_modes))
            for r in chosen.itertuples() if r.role == "random"]
    sweeps = [iv.cached_sweep(model, model_id, rows, main, drop_ids, artifacts_dir, batch_size, verbose=verbose,
                              prefix=name).table("sweep")]
    if base:
        s = iv.cached_sweep(model, model_id, rows_random, base, drop_ids, artifacts_dir, batch_size, verbose=verbose,
                            prefix=name).table("sweep")
        if rows_random is not rows:  # another token set: its rows and its unintervened run kept apart
            s = s.assign(row=s.row + 10**6, mode=s["mode"].replace("nominal", "nominal (random rows)"))
        sweeps.append(s)
    sweep = pd.concat(sweeps, ignore_index=True)
    return Study(name, table, sp, chosen, partner["cos"], sweep, time.time() - t0)


def seed_summary(studies: dict) -> pd.DataFrame:
    """One row per model: its top candidate, its natural sign, ranks, null-space fraction (and its
    multiple of a random direction's; NaN and `null_space` False without a null space), the
    anti-entropy partner's effective cosine, and the total effect of the top candidate at the grid's
    top (its typical large activation) vs 0 on the scale, entropy and reciprocal rank, its
    `effect_role`; `monotone` when scale and entropy both move monotonically in the same `direction`
    (+1 up, -1 down) over the whole two-sided grid."""
    from helpers.entropy import interventions as iv

    out = []
    for name, s in studies.items():
        top = s.role("entropy").iloc[0]
        t = s.table.set_index(["layer", "neuron"]).loc[(int(top.layer), int(top.neuron))]
        eff = iv.effect_summary(s.sweep)
        e = eff[(eff.role == "entropy") & (eff["mode"] == "total")].iloc[0]
        rnd = eff[(eff.role == "random") & (eff["mode"] == "total")]
        out.append({"model": name, "neuron": f"L{int(top.layer)}.{int(top.neuron)}", "act_sign": int(top.act_sign),
                    "effect_role": effect_role(e.d_entropy), "null_space": s.spectrum.has_null_space, "l2_rank": int(t.l2_rank),
                    "vocab_var_rank": int(t.vocab_var_rank), "null_frac": float(t.null_frac), "null_ratio": float(t.null_ratio),
                    "k": s.spectrum.k, "partner_cos": s.partner_cos, "d_scale": e.d_scale, "d_entropy": e.d_entropy, "d_rr": e.d_rr,
                    "monotone": bool(e.scale_monotone and e.entropy_monotone and e.scale_direction == e.entropy_direction),
                    "direction": int(e.entropy_direction),
                    "top1_same_min": e.top1_same_min,
                    "random_max_abs_d_entropy": float(rnd.d_entropy.abs().max()) if len(rnd) else np.nan})
    return pd.DataFrame(out).set_index("model")

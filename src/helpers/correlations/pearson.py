"""Streaming neuron-to-neuron Pearson correlation and the universality baselines.

Gurnee et al. (2024, section 2) correlate every neuron of one GPT2 model with
every neuron of other models over ~100M tokens, take each neuron's maximum
correlation, and compare it with the same maximum against a randomly rotated
copy of the other model's activations ("excess correlation").

Where the streaming accumulator (`helpers.streaming.accumulators.StreamingPearson`, with its
precision design) is too large for a memory budget, :func:`plan_blocks` splits the rows (the
``n_a`` variables) into blocks that fit it, and :class:`BlockedStreamingPearson` makes one pass
over the data per block.  GPT2-medium all-pairs (98,304 x 98,304 neurons) needs 38.7 GB for the
fp32 block alone, 154.6 GB including fp64 totals and the fp32 result (161 GB peak with batch
scratch), so on an 80 GB GPU it must be blocked; ``print(plan_blocks(98_304, 98_304, 80e9))``
gives::

    correlation 98,304 x 98,304 (16 B/pair, batches of 4,096 tokens)
      full accumulator: 161.3 GB peak (154.6 GB for the pairs); budget 80.0 GB
      3 blocks of 32,768 rows (56.0 GB each), 3 passes over the data
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

from helpers.streaming.accumulators import PROLOGUE_TOKENS, StreamingPearson

__all__ = [
    "BlockedStreamingPearson",
    "BlockPlan",
    "plan_blocks",
    "random_rotation",
    "gaussian_rotation",
    "apply_rotation",
    "max_correlation",
    "layer_offsets",
    "global_to_layer_neuron",
    "excess_correlation",
    "mixed_correlation",
]

# Bytes per (row, column) pair: fp32 running block (4) + fp64 totals (8) + fp32
# correlation output (4) that exists at the end of a pass.
DEFAULT_BYTES_PER_ELEM = 16
# Bytes per variable: fp32 shift + fp64 sum + fp64 sum of squares + fp32 scratch.
_BYTES_PER_VARIABLE = 32


# ---------------------------------------------------------------------- blocks
@dataclass(frozen=True)
class BlockPlan:
    """How to fit an ``n_a x n_b`` correlation into a memory budget.

    Attributes:
        n_a, n_b: problem size (rows are the ``n_a`` / x variables).
        memory_budget_bytes: the budget the plan was made for.
        bytes_per_elem: bytes per (row, col) pair (default 16 = fp32 block +
            fp64 totals + fp32 result).
        batch_tokens: batch size assumed for the fp32 scratch buffers.
        bytes_full: peak bytes of a single unblocked accumulator.
        n_blocks: number of row blocks (== passes over the data).
        rows_per_block: rows per block (the last block may be smaller).
        passes: passes over the data needed.
        bytes_per_block: peak bytes of one block's accumulator.
    """

    n_a: int
    n_b: int
    memory_budget_bytes: int
    bytes_per_elem: int
    batch_tokens: int
    bytes_full: int
    n_blocks: int
    rows_per_block: int
    passes: int
    bytes_per_block: int

    def row_slices(self) -> list[slice]:
        """The ``n_blocks`` row slices covering ``range(n_a)``."""
        r = self.rows_per_block
        return [slice(s, min(self.n_a, s + r)) for s in range(0, self.n_a, r)]

    def __str__(self) -> str:
        gb = 1e9
        lines = [
            f"correlation {self.n_a:,} x {self.n_b:,} "
            f"({self.bytes_per_elem} B/pair, batches of {self.batch_tokens:,} tokens)",
            f"  full accumulator: {self.bytes_full / gb:,.1f} GB peak "
            f"({self.n_a * self.n_b * self.bytes_per_elem / gb:,.1f} GB for the pairs); "
            f"budget {self.memory_budget_bytes / gb:,.1f} GB",
        ]
        if self.n_blocks == 1:
            lines.append("  fits: 1 block, 1 pass over the data")
        else:
            lines.append(
                f"  {self.n_blocks} blocks of {self.rows_per_block:,} rows "
                f"({self.bytes_per_block / gb:,.1f} GB each), {self.passes} passes over the data"
            )
        return "\n".join(lines)


def _accumulator_bytes(rows: int, n_b: int, bytes_per_elem: int, batch_tokens: int) -> int:
    pairs = rows * n_b * bytes_per_elem
    vectors = (rows + n_b) * _BYTES_PER_VARIABLE
    # fp32 batch scratch + the caller's batch, and the CPU prologue's slice of squares.
    scratch = (batch_tokens * 2 + min(batch_tokens, PROLOGUE_TOKENS)) * (rows + n_b) * 4
    return pairs + vectors + scratch


def plan_blocks(
    n_a: int,
    n_b: int,
    memory_budget_bytes: float,
    bytes_per_elem: int = DEFAULT_BYTES_PER_ELEM,
    batch_tokens: int = 4096,
) -> BlockPlan:
    """Split the ``n_a`` rows into the fewest equal blocks that fit the budget.

    Each block holds ``rows x n_b`` pairs (``bytes_per_elem`` each) plus
    per-variable vectors and ``batch_tokens``-row fp32 scratch; one pass over
    the data is needed per block.  Raises ``ValueError`` if even one row does
    not fit.  Nothing is allocated.
    """
    if n_a < 1 or n_b < 1:
        raise ValueError(f"n_a and n_b must be positive, got {n_a}, {n_b}")
    budget = int(memory_budget_bytes)
    full = _accumulator_bytes(n_a, n_b, bytes_per_elem, batch_tokens)
    per_row = _accumulator_bytes(1, 0, bytes_per_elem, batch_tokens) + n_b * bytes_per_elem
    fixed = _accumulator_bytes(0, n_b, bytes_per_elem, batch_tokens)
    if full <= budget:
        n_blocks = 1
    else:
        max_rows = (budget - fixed) // per_row
        if max_rows < 1:
            raise ValueError(
                f"budget {budget / 1e9:.3g} GB cannot hold a single row of {n_b:,} columns "
                f"(needs {(fixed + per_row) / 1e9:.3g} GB)"
            )
        n_blocks = math.ceil(n_a / max_rows)
    rows = math.ceil(n_a / n_blocks)
    n_blocks = math.ceil(n_a / rows)
    return BlockPlan(
        n_a=n_a,
        n_b=n_b,
        memory_budget_bytes=budget,
        bytes_per_elem=bytes_per_elem,
        batch_tokens=batch_tokens,
        bytes_full=full,
        n_blocks=n_blocks,
        rows_per_block=rows,
        passes=n_blocks,
        bytes_per_block=_accumulator_bytes(rows, n_b, bytes_per_elem, batch_tokens),
    )


class BlockedStreamingPearson:
    """Correlation of ``n_a x n_b`` variables in row blocks that fit a memory budget.

    One :class:`StreamingPearson` over ``x[:, rows]`` is alive at a time; each
    block needs its own pass over the data, so the data must be re-iterable:
    ``make_batches()`` is called once per block and must yield the same
    ``(x [tokens, n_a], y [tokens, n_b])`` batches each time.

    Results are gathered on ``result_device`` (CPU by default: the GPT2-medium
    all-pairs result alone is 38.7 GB); use :meth:`iter_blocks` to stream
    ``(row_slice, corr_block)`` to disk instead.
    """

    def __init__(
        self,
        n_a: int,
        n_b: int,
        memory_budget_bytes: float,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        *,
        result_device: str | torch.device = "cpu",
        batch_tokens: int = 4096,
        **accumulator_kwargs,
    ) -> None:
        self.plan = plan_blocks(n_a, n_b, memory_budget_bytes, batch_tokens=batch_tokens)
        self.n_a, self.n_b = n_a, n_b
        self.device = torch.device(device)
        self.precision = precision
        self.result_device = torch.device(result_device)
        self._kwargs = dict(accumulator_kwargs)
        self.dead_a: torch.Tensor | None = None
        self.dead_b: torch.Tensor | None = None
        self.n_tokens = 0

    def iter_blocks(
        self, make_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    ) -> Iterator[tuple[slice, torch.Tensor]]:
        """Yield ``(row_slice, corr [rows, n_b] float32 on device)`` per block (one data pass each)."""
        dead_a = torch.zeros(self.n_a, dtype=torch.bool)
        for sl in self.plan.row_slices():
            acc = StreamingPearson(
                sl.stop - sl.start, self.n_b, self.device, self.precision, **self._kwargs
            )
            for x, y in make_batches():
                acc.update(x[:, sl], y)
            if self.n_tokens and acc.n_tokens != self.n_tokens:
                raise RuntimeError(
                    f"make_batches() gave {acc.n_tokens} tokens for rows {sl}, "
                    f"{self.n_tokens} before: the data must be identical on every pass"
                )
            self.n_tokens = acc.n_tokens
            dead_a[sl] = acc.dead_a().cpu()
            self.dead_b = acc.dead_b().cpu()
            corr = acc.correlation()
            del acc
            yield sl, corr
        self.dead_a = dead_a

    def compute(
        self, make_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]]
    ) -> torch.Tensor:
        """Run all passes; return the full ``[n_a, n_b]`` float32 correlation on ``result_device``."""
        out = torch.empty(self.n_a, self.n_b, dtype=torch.float32, device=self.result_device)
        for sl, corr in self.iter_blocks(make_batches):
            out[sl] = corr.to(self.result_device)
        return out


# ------------------------------------------------------------------- baselines
def random_rotation(
    d: int, seed: int, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Haar-distributed random orthogonal matrix ``[d, d]``, reproducible from ``seed``.

    QR of a float64 standard Gaussian drawn from a private CPU
    ``torch.Generator`` (the global RNG is neither used nor advanced), with the
    columns of Q multiplied by ``sign(diag(R))`` so the distribution is Haar.
    Built in float64 on CPU (same matrix on every device), then cast.
    """
    if d < 1:
        raise ValueError(f"d must be positive, got {d}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    g = torch.randn(d, d, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(r))
    sign[sign == 0] = 1.0
    q = q * sign[None, :]
    return q.to(device=device, dtype=dtype)


def gaussian_rotation(
    d: int, seed: int, device: str | torch.device | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The paper's baseline ``[d, d]``: standard Gaussian with each row scaled to unit norm.

    Not orthogonal (rows are only nearly orthogonal for large ``d``).  Seeded
    private generator, float64 on CPU, then cast.
    """
    if d < 1:
        raise ValueError(f"d must be positive, got {d}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    g = torch.randn(d, d, generator=gen, dtype=torch.float64)
    g = g / torch.linalg.vector_norm(g, dim=1, keepdim=True)
    return g.to(device=device, dtype=dtype)


def apply_rotation(acts: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Rotate activations: ``acts [tokens, d] @ R.T -> [tokens, d]``.

    Rotated unit ``j`` is ``sum_k R[j, k] * acts[:, k]``.  Computed in the
    promoted dtype of the two, at least float32 (fp16 activations are not
    rotated in fp16), on ``acts``'s device.
    """
    if acts.dim() != 2 or R.dim() != 2 or R.shape[0] != R.shape[1] or R.shape[1] != acts.shape[1]:
        raise ValueError(f"expected acts [tokens, d] and R [d, d], got {tuple(acts.shape)}, {tuple(R.shape)}")
    dtype = torch.promote_types(torch.promote_types(acts.dtype, R.dtype), torch.float32)
    return acts.to(dtype) @ R.to(device=acts.device, dtype=dtype).T


# ------------------------------------------------------------------- summaries
def layer_offsets(layer_sizes: Sequence[int]) -> list[int]:
    """Start index of each layer in the concatenated neuron axis (``len = n_layers + 1``)."""
    offsets = [0]
    for size in layer_sizes:
        if size < 0:
            raise ValueError(f"layer sizes must be non-negative, got {list(layer_sizes)}")
        offsets.append(offsets[-1] + int(size))
    return offsets


def global_to_layer_neuron(index, layer_sizes: Sequence[int]):
    """Map global neuron indices to ``(layer, neuron)`` within layer.

    ``index`` may be an int or an integer tensor; ``-1`` (no neuron, e.g. an
    all-NaN row) maps to ``(-1, -1)``.  Returns ints or two int64 tensors.
    """
    offsets = layer_offsets(layer_sizes)
    total = offsets[-1]
    if isinstance(index, torch.Tensor):
        idx = index.long()
        valid = idx >= 0
        if bool((idx >= total).any()):
            raise ValueError(f"index out of range for {total} neurons")
        starts = torch.tensor(offsets[:-1], dtype=torch.long, device=idx.device)
        ends = torch.tensor(offsets[1:], dtype=torch.long, device=idx.device)
        # searchsorted over layer ends skips empty layers (start == end).
        layer = torch.searchsorted(ends, idx.clamp_min(0), right=True)
        neuron = idx - starts[layer.clamp_max(len(offsets) - 2)]
        return layer.masked_fill(~valid, -1), neuron.masked_fill(~valid, -1)
    index = int(index)
    if index < 0:
        return -1, -1
    if index >= total:
        raise ValueError(f"index {index} out of range for {total} neurons")
    for layer in range(len(offsets) - 1):
        if offsets[layer] <= index < offsets[layer + 1]:
            return layer, index - offsets[layer]
    raise AssertionError("unreachable")


def max_correlation(
    corr: torch.Tensor, layer_sizes_b: Sequence[int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row maximum (signed) correlation, ignoring NaN.

    Args:
        corr: ``[n_a, n_b]`` correlations of each reference neuron with all
            neurons of another model (its layers concatenated).
        layer_sizes_b: the other model's layer sizes; checked to sum to ``n_b``
            (use :func:`global_to_layer_neuron` to decode the argmax).
    Returns:
        ``(values [n_a] in corr's dtype, argmax [n_a] int64 global index)``;
        an all-NaN row gives ``(NaN, -1)``.
    """
    if corr.dim() != 2:
        raise ValueError(f"corr must be [n_a, n_b], got {tuple(corr.shape)}")
    if layer_sizes_b is not None and sum(layer_sizes_b) != corr.shape[1]:
        raise ValueError(f"layer sizes sum to {sum(layer_sizes_b)}, corr has {corr.shape[1]} columns")
    nan = torch.isnan(corr)
    values, index = corr.masked_fill(nan, float("-inf")).max(dim=1)
    all_nan = nan.all(dim=1)
    values = values.masked_fill(all_nan, float("nan"))
    index = index.masked_fill(all_nan, -1)
    return values, index


def excess_correlation(max_corr: torch.Tensor, max_baseline: torch.Tensor) -> torch.Tensor:
    """Mean over models of ``max_corr - max_baseline``: ``[n_a, n_models] -> [n_a]``.

    NaN-aware: a model where either value is NaN (dead neuron) is left out of
    that neuron's mean; a neuron with no valid model gives NaN.  Float64 math,
    returned in the promoted input dtype.
    """
    if max_corr.shape != max_baseline.shape:
        raise ValueError(f"shapes differ: {tuple(max_corr.shape)} vs {tuple(max_baseline.shape)}")
    if max_corr.dim() == 1:
        max_corr, max_baseline = max_corr[:, None], max_baseline[:, None]
    if max_corr.dim() != 2:
        raise ValueError(f"expected [n_a, n_models], got {tuple(max_corr.shape)}")
    dtype = torch.promote_types(max_corr.dtype, max_baseline.dtype)
    diff = max_corr.double() - max_baseline.double().to(max_corr.device)
    return torch.nanmean(diff, dim=1).to(dtype)


def mixed_correlation(cross: StreamingPearson, cols: slice, gram: StreamingPearson, mix: torch.Tensor,
                      dead_rtol: float = 1e-12) -> torch.Tensor:
    """Correlation of ``cross``'s x variables with the mixed units ``z = mix @ y[cols]``, without streaming z.

    Pearson correlation is built from covariances, which are linear in each argument:
    ``cov(x, z) = cov(x, y[cols]) @ mix.T`` and ``var(z_k) = (mix C mix.T)_kk``, with
    ``C = cov(y[cols], y[cols])`` taken from ``gram``, an accumulator that saw the same
    ``y[cols]`` batches as both its x and its y.  This is how the rotation baseline is
    computed: the paper streams the rotated activations ``R y`` through a second full
    correlation; the cross-covariance with ``y`` (needed anyway) and one ``d x d`` covariance
    per layer give the same numbers (float64 algebra at the end) for a fraction of the work.

    Args:
        cross: accumulator of x against all y variables.
        cols: the y columns that were mixed (e.g. one layer of one model).
        gram: accumulator of ``y[cols]`` against itself, fed the same tokens as ``cross``.
        mix: ``[k, len(cols)]`` mixing matrix (e.g. a rotation).
    Returns ``[n_a, k]`` float32 correlations; NaN rows for dead x, NaN columns for constant z.
    """
    d = len(range(cross.n_b)[cols])
    if gram.n_a != d or gram.n_b != d:
        raise ValueError(f"gram must be a {d} x {d} accumulator of y[cols], got {gram.n_a} x {gram.n_b}")
    if mix.dim() != 2 or mix.shape[1] != d:
        raise ValueError(f"mix must be [k, {d}], got {tuple(mix.shape)}")
    if gram.n_tokens != cross.n_tokens:
        raise ValueError(f"gram saw {gram.n_tokens:,} tokens and cross {cross.n_tokens:,}: feed both the same batches")
    dev = cross.device
    m = mix.to(dev, torch.float64)
    cov = cross.covariance(cols) @ m.T
    c_yy = gram.covariance().to(dev)
    var_z = ((m @ c_yy) * m).sum(1).clamp_min_(0.0)
    _, var_a, dead_a = cross._moments("a")
    mean_y = gram.means()[0].to(dev)
    raw_second = (m * m) @ (torch.diagonal(c_yy) + mean_y * mean_y)
    dead_z = var_z <= dead_rtol * raw_second
    inv_a = var_a.rsqrt().masked_fill_(dead_a, float("nan"))
    inv_z = var_z.rsqrt().masked_fill_(dead_z, float("nan"))
    return cov.mul_(inv_a[:, None]).mul_(inv_z[None, :]).clamp_(-1.0, 1.0).float()

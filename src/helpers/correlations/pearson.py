"""Streaming neuron-to-neuron Pearson correlation and the universality baselines.

Gurnee et al. (2024, section 2) correlate every neuron of one GPT2 model with
every neuron of other models over ~100M tokens, take each neuron's maximum
correlation, and compare it with the same maximum against a randomly rotated
copy of the other model's activations ("excess correlation").

Precision design of :class:`StreamingPearson`
---------------------------------------------
The reference implementation summed raw (uncentred) cross products and reduced
the per-neuron sums and sums of squares in fp16.  That breaks on GPT2 neurons,
whose means can be ~100x their standard deviation: fp16 running sums overflow
(max 65504) or stop changing once they are ~2e3 times the addends, and
``cov = E[xy] - E[x]E[y]`` subtracts two numbers ~1e4 times larger than the
covariance, so an fp32 ``E[xy]`` (7 digits) leaves ~3 and the correlation is off
by ~1e-3.  Here, instead:

1. Every variable is shifted by a reference value ``c`` (the first batch's mean,
   rounded to fp32 and kept in the state) before anything is multiplied, so the
   products are of nearly centred data and nothing cancels catastrophically
   (``x - c`` is even exact in fp32 when ``c/2 <= x <= 2c``).
2. Per batch, one fp32 matmul (tf32 or bf16 inputs on request) is added into a
   running fp32 ``[n_a, n_b]`` block: ``addmm_`` on CUDA; elsewhere the product
   goes to an ``[n_a, n_b]`` scratch first, because MKL's ``addmm_`` rounds
   into C after every k-panel (~7x the error).  The block is flushed into
   float64 totals every ``flush_every`` tokens (default 2**20) or
   ``max_block_updates`` batches (default 256), whichever comes first, so fp32
   rounding accumulates over a bounded number of additions only.
3. Per-variable sums and sums of squares of the shifted data are reduced with
   ``torch.sum`` in fp32 (a cascade: ~1e-7 relative; a gemv with a ones vector
   is faster but sums sequentially, ~5e-5) and accumulated in float64.  On CPU
   the cast, shift and both sums run over slices of ``prologue_tokens`` (128)
   tokens that stay in cache, so the batch goes to memory once, not five times.
4. :meth:`StreamingPearson.correlation` and :meth:`StreamingPearson.merge`
   work in float64; merging re-centres the other accumulator's statistics onto
   this one's shifts algebraically, which is exact up to float64 rounding.

Result: after 10M fp16 tokens with means 100x the std the max absolute error
against a float64 reference is ~1.6e-6 (``benchmarks/correlation.py
--check-precision-tokens 10000000``), where the target is 1e-4.  ``bf16``
rounds the centred inputs of the product to 8 mantissa bits: errors ~1e-3.

Memory: the accumulator holds ``n_a * n_b * 12`` bytes (fp32 block + fp64
totals; +4 for the product scratch off CUDA) and
:meth:`StreamingPearson.correlation` produces a further 4-byte result.  :func:`plan_blocks` splits the rows (the ``n_a`` variables) into
blocks that fit a budget; :class:`BlockedStreamingPearson` then makes one pass
over the data per block.  GPT2-medium all-pairs (98,304 x 98,304 neurons) needs
38.7 GB for the fp32 block alone, 154.6 GB including fp64 totals and the fp32
result (161 GB peak with batch scratch), so on an 80 GB GPU it must be
blocked; ``print(plan_blocks(98_304, 98_304, 80e9))`` gives::

    correlation 98,304 x 98,304 (16 B/pair, batches of 4,096 tokens)
      full accumulator: 161.3 GB peak (154.6 GB for the pairs); budget 80.0 GB
      3 blocks of 32,768 rows (56.0 GB each), 3 passes over the data
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

__all__ = [
    "StreamingPearson",
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

_PRECISIONS = ("fp32", "tf32", "bf16")

# Bytes per (row, column) pair: fp32 running block (4) + fp64 totals (8) + fp32
# correlation output (4) that exists at the end of a pass.
DEFAULT_BYTES_PER_ELEM = 16
# Bytes per variable: fp32 shift + fp64 sum + fp64 sum of squares + fp32 scratch.
_BYTES_PER_VARIABLE = 32
# Default slice length of the CPU prologue (StreamingPearson(prologue_tokens=...)).
_PROLOGUE_TOKENS = 128


@contextlib.contextmanager
def _cuda_matmul_precision(device: torch.device, tf32: bool):
    """Force IEEE fp32 (or allow tf32) for CUDA matmuls inside the block."""
    if device.type != "cuda":
        yield
        return
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        # Only the new API: mixing it with reads of the legacy allow_tf32 flag
        # raises in recent torch.
        old, new = m.fp32_precision, ("tf32" if tf32 else "ieee")
        if old == new:
            yield
            return
        m.fp32_precision = new
        try:
            yield
        finally:
            m.fp32_precision = old
    else:  # pragma: no cover - older torch
        old = m.allow_tf32
        m.allow_tf32 = tf32
        try:
            yield
        finally:
            m.allow_tf32 = old


def _mm_fp32_out(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for bf16 inputs with an fp32 result (fp32 output when supported)."""
    if a.device.type == "cuda":
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError, NotImplementedError):  # pragma: no cover
            pass
    return torch.mm(a, b).float()


class StreamingPearson:
    """Streaming Pearson correlation between ``n_a`` and ``n_b`` variables.

    Feed batches with :meth:`update` (``x: [tokens, n_a]``, ``y: [tokens, n_b]``,
    any float dtype and device), then call :meth:`correlation` for the
    ``[n_a, n_b]`` matrix.  Accumulators can be merged (:meth:`merge`) and
    checkpointed (:meth:`state_dict` / :meth:`load_state_dict`).

    State (all on ``device``):
      * ``shift_a [n_a]``, ``shift_b [n_b]`` fp32: per-variable reference values
        (first batch's mean) subtracted before accumulation;
      * ``sum_a, sumsq_a [n_a]``, ``sum_b, sumsq_b [n_b]`` fp64: sums of shifted
        values and of their squares;
      * ``sxy [n_a, n_b]`` fp64: flushed sum of shifted cross products;
      * ``block [n_a, n_b]`` fp32: cross products since the last flush.

    Args:
        n_a, n_b: number of variables on each side.
        device: where accumulators live; inputs are moved there.
        precision: matmul precision: ``"fp32"`` (IEEE, default), ``"tf32"``
            (CUDA tensor cores; equals fp32 elsewhere) or ``"bf16"`` (centred
            inputs cast to bf16, fp32 products; errors ~1e-3).
        flush_every: flush the fp32 block into fp64 after this many tokens.
        max_block_updates: ... or after this many batches (bounds the number of
            fp32 additions when batches are tiny).
        chunk_tokens: batches longer than this are processed in chunks (bounds
            the fp32 inner-product length and the scratch buffers).
        prologue_tokens: on CPU, the cast, shift and per-variable sums run over
            slices of this many tokens, which stay in cache between steps.
        dead_rtol: a variable is "dead" (constant) when its variance is
            ``<= dead_rtol * E[x^2]``, i.e. std below ~1e-6 of its RMS.
    """

    def __init__(
        self,
        n_a: int,
        n_b: int,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        *,
        flush_every: int = 1 << 20,
        max_block_updates: int = 256,
        chunk_tokens: int = 8192,
        prologue_tokens: int = _PROLOGUE_TOKENS,
        dead_rtol: float = 1e-12,
    ) -> None:
        if n_a < 1 or n_b < 1:
            raise ValueError(f"n_a and n_b must be positive, got {n_a}, {n_b}")
        if precision not in _PRECISIONS:
            raise ValueError(f"precision must be one of {_PRECISIONS}, got {precision!r}")
        if min(flush_every, max_block_updates, chunk_tokens, prologue_tokens) < 1:
            raise ValueError("flush_every, max_block_updates, chunk_tokens and prologue_tokens must be >= 1")
        self.n_a, self.n_b = int(n_a), int(n_b)
        self.device = torch.device(device)
        self.precision = precision
        self.flush_every = int(flush_every)
        self.max_block_updates = int(max_block_updates)
        self.chunk_tokens = int(chunk_tokens)
        self.prologue_tokens = int(prologue_tokens)
        self.dead_rtol = float(dead_rtol)

        f32, f64, dev = torch.float32, torch.float64, self.device
        self._n = 0
        self._initialised = False  # shifts set?
        # Per-variable vectors are stored x-then-y in one tensor (with _a/_b
        # views) so each elementwise step is one op over a [tokens, n_a + n_b]
        # buffer.
        self._shift = torch.zeros(n_a + n_b, dtype=f32, device=dev)
        self._sum = torch.zeros(n_a + n_b, dtype=f64, device=dev)
        self._sumsq = torch.zeros(n_a + n_b, dtype=f64, device=dev)
        self._shift_a, self._shift_b = self._shift[:n_a], self._shift[n_a:]
        self._sum_a, self._sum_b = self._sum[:n_a], self._sum[n_a:]
        self._sumsq_a, self._sumsq_b = self._sumsq[:n_a], self._sumsq[n_a:]
        self._sxy = torch.zeros(n_a, n_b, dtype=f64, device=dev)
        self._block = torch.zeros(n_a, n_b, dtype=f32, device=dev)
        self._block_tokens = 0
        self._block_updates = 0
        # Scratch (not state): flat fp32 storage reused across batches, because
        # fresh large allocations cost page faults on CPU.
        self._scratch_xy = torch.empty(0, dtype=f32, device=dev)
        self._scratch_sq = torch.empty(0, dtype=f32, device=dev)  # squares of one prologue slice
        self._prod: torch.Tensor | None = None  # [n_a, n_b] product scratch, non-CUDA only
        self._vec = torch.empty(n_a + n_b, dtype=f32, device=dev)

    # ------------------------------------------------------------------ basics
    @property
    def n_tokens(self) -> int:
        """Number of tokens (rows) accumulated so far."""
        return self._n

    @property
    def shifts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The fp32 reference values ``([n_a], [n_b])`` subtracted before accumulation."""
        return self._shift_a, self._shift_b

    def __repr__(self) -> str:
        return (
            f"StreamingPearson(n_a={self.n_a}, n_b={self.n_b}, device={self.device}, "
            f"precision={self.precision!r}, n_tokens={self._n})"
        )

    def set_shifts(self, shift_a: torch.Tensor, shift_b: torch.Tensor) -> None:
        """Fix the reference values before any data (e.g. to share them across shards).

        Only allowed while the accumulator is empty; values are rounded to fp32.
        """
        if self._n:
            raise ValueError("set_shifts() must be called before the first update")
        shift_a = torch.as_tensor(shift_a)
        shift_b = torch.as_tensor(shift_b)
        if shift_a.shape != (self.n_a,) or shift_b.shape != (self.n_b,):
            raise ValueError(
                f"shifts must have shapes ({self.n_a},) and ({self.n_b},), "
                f"got {tuple(shift_a.shape)} and {tuple(shift_b.shape)}"
            )
        self._shift_a.copy_(shift_a)
        self._shift_b.copy_(shift_b)
        self._initialised = True

    # ------------------------------------------------------------------ update
    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Accumulate a batch.

        Args:
            x: ``[tokens, n_a]`` floating tensor, any dtype/device (rounded to fp32).
            y: ``[tokens, n_b]`` floating tensor with the same number of tokens.
        """
        if x.dim() != 2 or y.dim() != 2:
            raise ValueError(f"x and y must be 2-D [tokens, vars], got {tuple(x.shape)}, {tuple(y.shape)}")
        if x.shape[1] != self.n_a or y.shape[1] != self.n_b:
            raise ValueError(
                f"expected x [tokens, {self.n_a}] and y [tokens, {self.n_b}], "
                f"got {tuple(x.shape)} and {tuple(y.shape)}"
            )
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x and y have different token counts: {x.shape[0]} vs {y.shape[0]}")
        if not (x.is_floating_point() and y.is_floating_point()):
            raise TypeError(f"x and y must be floating point, got {x.dtype} and {y.dtype}")
        t = x.shape[0]
        for start in range(0, t, self.chunk_tokens):
            stop = min(t, start + self.chunk_tokens)
            self._update_chunk(x[start:stop], y[start:stop])

    def _scratch(self, name: str, numel: int) -> torch.Tensor:
        buf = getattr(self, name)
        if buf.numel() < numel:
            buf = torch.empty(numel, dtype=buf.dtype, device=self.device)
            setattr(self, name, buf)
        return buf

    def _update_chunk(self, x: torch.Tensor, y: torch.Tensor) -> None:
        t = x.shape[0]
        if t == 0:
            return
        # Cast (and device move) x and y side by side into one reusable fp32
        # buffer [t, n_a + n_b]; BLAS takes the two column views directly.
        w = self.n_a + self.n_b
        buf = self._scratch("_scratch_xy", t * w)[: t * w].view(t, w)
        xs, ys = buf[:, : self.n_a], buf[:, self.n_a :]
        if not self._initialised:
            xs.copy_(x)
            ys.copy_(y)
            self._shift.copy_(buf.mean(0, dtype=torch.float64))
            self._initialised = True
        # On CUDA the squares are taken in place after the product (no extra
        # batch-sized scratch); on CPU they are part of the cache-sized prologue.
        on_cuda = self.device.type == "cuda"
        self._prologue(x, y, buf, squares=not on_cuda)

        if self.precision == "bf16":
            self._block.add_(_mm_fp32_out(xs.to(torch.bfloat16).T, ys.to(torch.bfloat16)))
        elif self.device.type == "cuda":
            # cuBLAS adds beta*C once, in the epilogue, after the full k-sum.
            with _cuda_matmul_precision(self.device, self.precision == "tf32"):
                self._block.addmm_(xs.T, ys)
        elif self._block_updates == 0:
            torch.mm(xs.T, ys, out=self._block)
        else:
            # MKL's addmm_ adds each k-panel into C in fp32 (~7x the error of
            # one product), so take the product whole, then add it.
            if self._prod is None:
                self._prod = torch.empty_like(self._block)
            self._block.add_(torch.mm(xs.T, ys, out=self._prod))
        if on_cuda:
            self._sumsq.add_(torch.sum(buf.square_(), 0, out=self._vec))  # buf no longer needed

        self._n += t
        self._block_tokens += t
        self._block_updates += 1
        if self._block_tokens >= self.flush_every or self._block_updates >= self.max_block_updates:
            self.flush()

    def _prologue(self, x: torch.Tensor, y: torch.Tensor, buf: torch.Tensor, squares: bool) -> None:
        """Write the shifted fp32 batch into ``buf`` and add its sums (and sums of squares).

        On CPU the batch is processed in slices of ``prologue_tokens`` rows, so that the
        cast, shift, sum, square and sum of one slice run on cache-resident data (one
        trip to memory instead of five).  ``torch.sum`` reduces each slice in a cascade
        (~1e-7 relative); the slices' sums are added in float64.  A gemv with a ones
        vector would be faster but sums sequentially (~5e-5 at 4k tokens).
        """
        t, n_a = buf.shape[0], self.n_a
        step = min(t, self.prologue_tokens) if squares else t
        sq = self._scratch("_scratch_sq", step * buf.shape[1] if squares else 0)
        for a in range(0, t, step):
            b = min(t, a + step)
            part = buf[a:b]
            part[:, :n_a].copy_(x[a:b])
            part[:, n_a:].copy_(y[a:b])
            part.sub_(self._shift)
            self._sum.add_(torch.sum(part, 0, out=self._vec))
            if squares:
                sqr = torch.mul(part, part, out=sq[: part.numel()].view_as(part))
                self._sumsq.add_(torch.sum(sqr, 0, out=self._vec))

    def flush(self) -> None:
        """Add the fp32 running block into the float64 totals and clear it."""
        if self._block_updates:
            self._sxy.add_(self._block)
            self._block.zero_()
            self._block_tokens = 0
            self._block_updates = 0

    # ------------------------------------------------------------------ merge
    def merge(self, other: "StreamingPearson") -> "StreamingPearson":
        """Add ``other``'s statistics into this accumulator (``other`` is unchanged).

        The other accumulator may use different shifts: its sums are re-centred
        onto this accumulator's shifts exactly in float64 (with ``d = c' - c``:
        ``S1 += S1' + n'd``, ``S2 += S2' + 2 d S1' + n' d^2``,
        ``Sxy += Sxy' + S1'_a d_b^T + d_a S1'_b^T + n' d_a d_b^T``).
        Returns ``self``.
        """
        if not isinstance(other, StreamingPearson):
            raise TypeError(f"can only merge a StreamingPearson, got {type(other).__name__}")
        if (other.n_a, other.n_b) != (self.n_a, self.n_b):
            raise ValueError(
                f"cannot merge accumulators of shapes ({other.n_a}, {other.n_b}) "
                f"into ({self.n_a}, {self.n_b})"
            )
        if other._n == 0:
            return self
        dev = self.device
        o_shift_a = other._shift_a.to(dev)
        o_shift_b = other._shift_b.to(dev)
        if not self._initialised:
            self._shift_a.copy_(o_shift_a)
            self._shift_b.copy_(o_shift_b)
            self._initialised = True
        n_o = float(other._n)
        s1a, s1b = other._sum_a.to(dev), other._sum_b.to(dev)
        # fp32 - fp32 differences are exact in fp64.
        da = o_shift_a.double() - self._shift_a.double()
        db = o_shift_b.double() - self._shift_b.double()

        self._sxy.add_(other._sxy.to(dev))
        self._sxy.add_(other._block.to(dev))
        if bool(da.any()) or bool(db.any()):
            self._sxy.addr_(s1a, db)
            self._sxy.addr_(da, s1b)
            self._sxy.addr_(da, db, alpha=n_o)
        self._sumsq_a.add_(other._sumsq_a.to(dev) + 2.0 * da * s1a + n_o * da * da)
        self._sumsq_b.add_(other._sumsq_b.to(dev) + 2.0 * db * s1b + n_o * db * db)
        self._sum_a.add_(s1a + n_o * da)
        self._sum_b.add_(s1b + n_o * db)
        self._n += other._n
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain dict of tensors and ints (savable with ``torch.save``).

        Tensors are references to the live accumulators (as for
        ``nn.Module.state_dict``): save or clone before updating again.  The
        unflushed fp32 block is included so that a resumed run is bit-identical
        to an uninterrupted one.
        """
        return {
            "n_a": self.n_a,
            "n_b": self.n_b,
            "n_tokens": self._n,
            "initialised": int(self._initialised),
            "flush_every": self.flush_every,
            "max_block_updates": self.max_block_updates,
            "block_tokens": self._block_tokens,
            "block_updates": self._block_updates,
            "shift_a": self._shift_a,
            "shift_b": self._shift_b,
            "sum_a": self._sum_a,
            "sum_b": self._sum_b,
            "sumsq_a": self._sumsq_a,
            "sumsq_b": self._sumsq_b,
            "sxy": self._sxy,
            "block": self._block,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (copied onto this accumulator's device)."""
        if (int(state["n_a"]), int(state["n_b"])) != (self.n_a, self.n_b):
            raise ValueError(
                f"state is for shape ({state['n_a']}, {state['n_b']}), "
                f"accumulator is ({self.n_a}, {self.n_b})"
            )
        for key in ("shift_a", "shift_b", "sum_a", "sum_b", "sumsq_a", "sumsq_b", "sxy", "block"):
            dst = getattr(self, "_" + key)
            src = state[key]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"state[{key!r}] has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
            dst.copy_(src)
        self._n = int(state["n_tokens"])
        self._initialised = bool(state["initialised"])
        self.flush_every = int(state["flush_every"])
        self.max_block_updates = int(state["max_block_updates"])
        self._block_tokens = int(state["block_tokens"])
        self._block_updates = int(state["block_updates"])

    # ------------------------------------------------------------------ results
    def _moments(self, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean of shifted values, variance, dead mask) in float64 for one side."""
        s1, s2, shift = (
            (self._sum_a, self._sumsq_a, self._shift_a)
            if side == "a"
            else (self._sum_b, self._sumsq_b, self._shift_b)
        )
        if self._n == 0:
            nan = torch.full_like(s1, float("nan"))
            return nan, nan, torch.ones_like(s1, dtype=torch.bool)
        n = float(self._n)
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min_(0.0)
        raw_second = var + (mean + shift.double()) ** 2
        dead = var <= self.dead_rtol * raw_second
        return mean, var, dead

    def dead_a(self) -> torch.Tensor:
        """``[n_a]`` bool: constant x-variables (all True before any data)."""
        return self._moments("a")[2]

    def dead_b(self) -> torch.Tensor:
        """``[n_b]`` bool: constant y-variables (all True before any data)."""
        return self._moments("b")[2]

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Float64 means ``([n_a], [n_b])`` of the raw (unshifted) variables."""
        ma = self._moments("a")[0] + self._shift_a.double()
        mb = self._moments("b")[0] + self._shift_b.double()
        return ma, mb

    def correlation(self, dtype: torch.dtype = torch.float32, chunk_elems: int = 1 << 24) -> torch.Tensor:
        """Pearson correlation ``[n_a, n_b]`` (float32 by default) on the accumulator device.

        Computed in float64 from the shifted statistics (row chunks of at most
        ``chunk_elems`` elements of fp64 scratch), then cast to ``dtype``.  Rows of dead x
        and columns of dead y are NaN; everything is NaN before any data.
        Values are clamped to [-1, 1].  Does not modify the accumulator.
        """
        out = torch.empty(self.n_a, self.n_b, dtype=dtype, device=self.device)
        if self._n == 0:
            return out.fill_(float("nan"))
        _, var_a, dead_a = self._moments("a")
        _, var_b, dead_b = self._moments("b")
        inv_a = var_a.rsqrt().masked_fill_(dead_a, float("nan"))
        inv_b = var_b.rsqrt().masked_fill_(dead_b, float("nan"))
        rows = max(1, chunk_elems // self.n_b)
        for start in range(0, self.n_a, rows):
            sl = slice(start, min(self.n_a, start + rows))
            cov = self._centred_cross(sl, slice(None))
            cov.mul_(inv_a[sl, None]).mul_(inv_b[None, :])
            out[sl] = cov.clamp_(-1.0, 1.0)
        return out

    def covariance(self, cols: slice | None = None) -> torch.Tensor:
        """Float64 centred covariance ``E[(x - E x)(y - E y)]``, ``[n_a, n_cols]`` (NaN before any data).

        ``cols`` selects a slice of the y variables (default: all of them)."""
        cols = cols or slice(0, self.n_b)
        if self._n == 0:
            return torch.full((self.n_a, len(range(self.n_b)[cols])), float("nan"), dtype=torch.float64, device=self.device)
        return self._centred_cross(slice(None), cols)

    def _centred_cross(self, rows: slice, cols: slice) -> torch.Tensor:
        """Float64 ``Sxy / n - mean_a mean_b^T`` of the shifted data for a sub-block (needs data)."""
        n = float(self._n)
        cov = self._block[rows, cols].double().add_(self._sxy[rows, cols]).div_(n)
        return cov.addr_(self._sum_a[rows] / n, self._sum_b[cols] / n, alpha=-1.0)


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
    scratch = (batch_tokens * 2 + min(batch_tokens, _PROLOGUE_TOKENS)) * (rows + n_b) * 4
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

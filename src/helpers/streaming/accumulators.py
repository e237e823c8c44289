"""The streaming accumulators: exact, mergeable statistics fed one batch of activations at a time.

Every pass over tokens (`helpers.streaming.activations.ActivationStream`) feeds one or more of
these, and each has the same shape: `update(...)` with a batch, `merge(other)` to combine shards
(torchrun ranks, or a resumed run's parts) exactly, `state_dict()` / `load_state_dict()` to
checkpoint and resume.

- `StreamingPearson`    Pearson correlations between `n_a` and `n_b` variables (chapter 01, eqs. 2-3);
- `StreamingMoments`    mean, variance, skew, kurtosis and positive fraction (chapter 02);
- `SignedLogHistogram`  a log-binned histogram by sign: the sign and mean of the top 1% of |x|
                        (chapters 02 and 05) and approximate quantiles;
- `GroupedMoments`      per-label sums for the variance reduction of eq. 4 (chapters 03 and 04).

Precision design of `StreamingPearson`
--------------------------------------
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
:meth:`StreamingPearson.correlation` produces a further 4-byte result
(``helpers.correlations.pearson.plan_blocks`` splits a correlation too large
for a memory budget into row blocks).

The others avoid the same cancellation their own way, written in their docstrings:
`StreamingMoments` keeps central sums about the running mean (pairwise updates, float64);
`GroupedMoments` shifts each variable by the first batch's mean before squaring.
"""

from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["StreamingPearson", "StreamingMoments", "SignedLogHistogram", "GroupedMoments", "PROLOGUE_TOKENS",
           "TOP_FRACTION"]


# --------------------------------------------------------------------------------------------
# Pearson correlation
# --------------------------------------------------------------------------------------------

_PRECISIONS = ("fp32", "tf32", "bf16")
# Default slice length of the CPU prologue (StreamingPearson(prologue_tokens=...)).
PROLOGUE_TOKENS = 128


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
        prologue_tokens: int = PROLOGUE_TOKENS,
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


# --------------------------------------------------------------------------------------------
# Exact streaming moments
# --------------------------------------------------------------------------------------------


def default_chunk_elems(device: torch.device, cpu: int) -> int:
    """Elements per chunk of an accumulator's update: on a CPU `cpu` (small enough for the chunk's
    float64 scratch to stay in cache: `benchmarks/accumulators.py` measures 1 << 18 about 3x faster
    than 1 << 22 for the moments), on an accelerator 1 << 24 (few, large kernels)."""
    return cpu if torch.device(device).type == "cpu" else 1 << 24


class StreamingMoments:
    """Exact streaming mean, variance, skew, kurtosis and positive fraction of `n` variables.

    Feed `update(x)` with `x` [tokens, n] (any float dtype and device; moved to `device`).
    Results, all float64 tensors [n] on `device`: `mean()`, `variance()` (population, 1/N),
    `skew()` = m3 / m2^1.5, `kurtosis()` = m4 / m2^2 (raw standardized fourth moment: a Gaussian
    gives 3, NOT the excess kurtosis), `fraction_positive()` = fraction of values > 0; `count`
    is the number of tokens seen.

    Design (precision): the state is `count`, the running float64 `mean` [n] and the float64
    central sums M2, M3, M4 [n] (sums of (x - mean)^k), plus an exact int64 count of positive
    values. The per-variable shift is therefore the running mean itself: each chunk of
    at most `chunk_elems` elements is reduced in two passes (its own mean, then the sums of
    powers of the deviations from it) and combined with the accumulator by the exact pairwise
    update of Chan et al. / Pébay (2008), with d = mean_b - mean_a and N = n_a + n_b:

        M2 = M2a + M2b + d^2 n_a n_b / N
        M3 = M3a + M3b + d^3 n_a n_b (n_a - n_b) / N^2 + 3 d (n_a M2b - n_b M2a) / N
        M4 = M4a + M4b + d^4 n_a n_b (n_a^2 - n_a n_b + n_b^2) / N^3
                 + 6 d^2 (n_a^2 M2b + n_b^2 M2a) / N^2 + 4 d (n_a M3b - n_b M3a) / N

    Raw power sums are never formed, so there is no catastrophic cancellation even when the
    mean is many standard deviations from zero (e.g. 1000x), and `merge` combines accumulators
    built anywhere, with any chunking, to rounding error (~1e-12 relative). Unlike the paper's
    256-bin histogram over [-10, 15] this is exact: no binning, no clipping of the tails.

    A variable whose variance is at most `dead_rtol` times its raw second moment (constant up to
    float32 resolution) has NaN skew and kurtosis; everything is NaN before any data.
    """

    def __init__(self, n: int, device: str | torch.device = "cpu", chunk_elems: int | None = None, dead_rtol: float = 1e-12):
        if n < 1:
            raise ValueError(f"n must be positive, got {n}")
        self.n = int(n)
        self.device = torch.device(device)
        self.chunk_elems = int(chunk_elems or default_chunk_elems(self.device, 1 << 18))
        self.dead_rtol = float(dead_rtol)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.count = 0
        self._mean = torch.zeros(self.n, **f64)
        self._m2 = torch.zeros(self.n, **f64)
        self._m3 = torch.zeros(self.n, **f64)
        self._m4 = torch.zeros(self.n, **f64)
        self._pos = torch.zeros(self.n, dtype=torch.int64, device=self.device)

    def __repr__(self) -> str:
        return f"StreamingMoments(n={self.n}, device={self.device}, count={self.count})"

    # ------------------------------------------------------------------ update / merge
    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "StreamingMoments":
        """Accumulate `x` [tokens, n] (a 1-D `x` is taken as one variable when n == 1)."""
        x = torch.as_tensor(x)
        if x.dim() == 1 and self.n == 1:
            x = x[:, None]
        if x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"expected x [tokens, {self.n}], got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        rows = max(1, self.chunk_elems // self.n)
        for start in range(0, x.shape[0], rows):
            self._update_chunk(x[start : start + rows])
        return self

    def _update_chunk(self, x: torch.Tensor) -> None:
        t = x.shape[0]
        if t == 0:
            return
        x = x.to(self.device, torch.float64)
        mean = x.mean(0)
        d = x - mean
        d2 = d * d
        m2 = d2.sum(0)
        m3 = (d2 * d).sum(0)
        m4 = d2.square_().sum(0)
        self._combine(t, mean, m2, m3, m4, (x > 0).sum(0))

    def _combine(self, nb: int, mean_b, m2b, m3b, m4b, pos_b) -> None:
        na = self.count
        if na == 0:
            for dst, src in ((self._mean, mean_b), (self._m2, m2b), (self._m3, m3b), (self._m4, m4b), (self._pos, pos_b)):
                dst.copy_(src)
            self.count = nb
            return
        n = na + nb
        fa, fb, fn = float(na), float(nb), float(n)
        d = mean_b - self._mean
        d2 = d * d
        m2a, m3a = self._m2.clone(), self._m3.clone()
        self._m4.add_(m4b + d2 * d2 * (fa * fb * (fa * fa - fa * fb + fb * fb) / fn**3)
                      + 6.0 * d2 * (fa * fa * m2b + fb * fb * m2a) / (fn * fn) + 4.0 * d * (fa * m3b - fb * m3a) / fn)
        self._m3.add_(m3b + d2 * d * (fa * fb * (fa - fb) / (fn * fn)) + 3.0 * d * (fa * m2b - fb * m2a) / fn)
        self._m2.add_(m2b + d2 * (fa * fb / fn))
        self._mean.add_(d * (fb / fn))
        self._pos.add_(pos_b.to(self._pos))
        self.count = n

    def merge(self, other: "StreamingMoments") -> "StreamingMoments":
        """Add `other`'s statistics into this accumulator (exactly; `other` is unchanged)."""
        if not isinstance(other, StreamingMoments):
            raise TypeError(f"can only merge a StreamingMoments, got {type(other).__name__}")
        if other.n != self.n:
            raise ValueError(f"cannot merge {other.n} variables into {self.n}")
        if other.count:
            dev = self.device
            self._combine(other.count, other._mean.to(dev), other._m2.to(dev), other._m3.to(dev), other._m4.to(dev),
                          other._pos.to(dev))
        return self

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Plain dict (CPU copies of the float64 state) for `torch.save`."""
        return {"n": self.n, "count": self.count, "mean": self._mean.cpu().clone(), "m2": self._m2.cpu().clone(),
                "m3": self._m3.cpu().clone(), "m4": self._m4.cpu().clone(), "n_pos": self._pos.cpu().clone()}

    def load_state_dict(self, state: dict) -> "StreamingMoments":
        """Restore from `state_dict()` (onto this accumulator's device); bit-exact."""
        if int(state["n"]) != self.n:
            raise ValueError(f"state is for {state['n']} variables, accumulator has {self.n}")
        for key, dst in (("mean", self._mean), ("m2", self._m2), ("m3", self._m3), ("m4", self._m4), ("n_pos", self._pos)):
            if tuple(state[key].shape) != (self.n,):
                raise ValueError(f"state[{key!r}] has shape {tuple(state[key].shape)}, expected ({self.n},)")
            dst.copy_(state[key])
        self.count = int(state["count"])
        return self

    # ------------------------------------------------------------------ results
    def _nan_if_empty(self, t: torch.Tensor) -> torch.Tensor:
        return torch.full_like(t, float("nan")) if self.count == 0 else t

    def mean(self) -> torch.Tensor:
        """[n] float64 mean."""
        return self._nan_if_empty(self._mean.clone())

    def variance(self) -> torch.Tensor:
        """[n] float64 population variance (divides by the count)."""
        return self._nan_if_empty(self._m2 / max(self.count, 1))

    def _standardized(self, m: torch.Tensor, power: float) -> torch.Tensor:
        var = self.variance()
        out = (m / max(self.count, 1)) / var.pow(power)
        dead = var <= self.dead_rtol * (var + self._mean.square())
        return out.masked_fill_(dead | var.isnan(), float("nan"))

    def skew(self) -> torch.Tensor:
        """[n] float64 skewness m3 / m2^1.5 (biased, = scipy.stats.skew(bias=True))."""
        return self._standardized(self._m3, 1.5)

    def kurtosis(self) -> torch.Tensor:
        """[n] float64 raw kurtosis m4 / m2^2 (Gaussian = 3; = scipy kurtosis(fisher=False, bias=True))."""
        return self._standardized(self._m4, 2.0)

    def fraction_positive(self) -> torch.Tensor:
        """[n] float64 fraction of the values that are > 0."""
        return self._nan_if_empty(self._pos.double() / max(self.count, 1))


# --------------------------------------------------------------------------------------------
# Log-binned histogram by sign: the typical large value
# --------------------------------------------------------------------------------------------


# "Large" = the top 1% of |activation|. Not the top decile: a sparse GELU neuron sits at its floor
# (about -0.17) on most tokens, and where it fires on fewer than a tenth of them, a decile mixes its
# firing with its floor and can come out negative (177 of the default family's 3,072 neurons did);
# its top 1% is its firing.
TOP_FRACTION = 0.01


class SignedLogHistogram:
    """Streaming log-binned histogram of `n` variables, split by sign, with the sum of the values in
    each bin: the sign of each variable's typical large value (`large_sign`: the sign of the mean over
    the top `TOP_FRACTION` of |x|),
    the mean over the top fraction of |x| (`top_mean`) and approximate quantiles (`quantile`), from
    one pass.

    Bins: `bins_per_octave` bins per factor 2 of |x| between 2^(min_exp - 1) and 2^max_exp (the end
    bins also hold everything below, zero included, and above), per sign when `split_sign` (needed
    by `quantile` only; `top_mean` needs the signed sums alone). State: `counts` [n, sides, bins]
    int64 and `sums` [n, sides, bins] float64 (with two sides, side 0: x < 0; side 1: x >= 0),
    mergeable (`update / merge / state_dict`).

    Cost and precision: the bin is the float's own exponent (`torch.frexp`), so a token costs a few
    float32 operations (chapter 02 feeds every neuron of every layer through it); counts are exact
    (float32 per chunk of at most `chunk_elems` values, then int64) and values are summed in
    float64 (a bin may hold every token of a neuron). The top-fraction boundary falls inside one bin; that bin's tokens
    are counted in proportion, at the bin's mean value, every bin above it exactly. Quantiles are
    a bin's mean value: within the bin's width (a factor 2^(1/bins_per_octave)) of the true one."""

    def __init__(self, n: int, device: str | torch.device = "cpu", bins_per_octave: int = 1, min_exp: int = -22,
                 max_exp: int = 11, split_sign: bool = True, chunk_elems: int | None = None):
        if n < 1 or bins_per_octave < 1 or min_exp >= max_exp:
            raise ValueError(f"need n >= 1, bins_per_octave >= 1 and min_exp < max_exp (got {n}, {bins_per_octave}, "
                             f"{min_exp}, {max_exp})")
        self.n, self.device = int(n), torch.device(device)
        self.per, self.min_exp, self.max_exp = int(bins_per_octave), int(min_exp), int(max_exp)
        self.chunk_elems = int(chunk_elems or default_chunk_elems(self.device, 1 << 20))
        self.nb = (self.max_exp - self.min_exp + 1) * self.per
        self.sides = 2 if split_sign else 1
        self.counts = torch.zeros(self.n, self.sides, self.nb, dtype=torch.int64, device=self.device)
        self.sums = torch.zeros(self.n, self.sides, self.nb, dtype=torch.float64, device=self.device)
        self._offset = (torch.arange(self.n, dtype=torch.int32, device=self.device) * (self.sides * self.nb))[None, :]

    @property
    def count(self) -> int:
        return int(self.counts[0].sum())

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> "SignedLogHistogram":
        """Accumulate `x` [tokens, n]."""
        x = torch.as_tensor(x)
        if x.dim() != 2 or x.shape[1] != self.n:
            raise ValueError(f"expected x [tokens, {self.n}], got {tuple(x.shape)}")
        rows = max(1, self.chunk_elems // self.n)
        size = self.n * self.sides * self.nb
        for s in range(0, x.shape[0], rows):
            c = x[s : s + rows].to(self.device, torch.float32)
            mant, e = torch.frexp(c)  # |c| in [2^(e-1), 2^e); frexp(0) = (0, 0)
            e = e.clamp_(self.min_exp, self.max_exp).masked_fill_(c == 0, self.min_exp)
            b = (e - self.min_exp) * self.per
            if self.per > 1:
                b += ((mant.abs() - 0.5) * (2 * self.per)).clamp_(0, self.per - 1).int()
            idx = b + self._offset
            if self.sides == 2:
                idx += (c >= 0).int() * self.nb
            idx = idx.reshape(-1)
            cnt = torch.zeros(size, device=self.device).index_add_(0, idx, torch.ones(1, device=self.device).expand(idx.numel()))
            sm = torch.zeros(size, dtype=torch.float64, device=self.device).index_add_(0, idx, c.reshape(-1).double())
            self.counts += cnt.view(self.n, self.sides, self.nb).round().long()
            self.sums += sm.view(self.n, self.sides, self.nb)
        return self

    def merge(self, other: "SignedLogHistogram") -> "SignedLogHistogram":
        if other.counts.shape != self.counts.shape:
            raise ValueError(f"cannot merge histograms of shape {tuple(other.counts.shape)} into {tuple(self.counts.shape)}")
        self.counts += other.counts.to(self.device)
        self.sums += other.sums.to(self.device)
        return self

    def state_dict(self) -> dict:
        return {"counts": self.counts.cpu().clone(), "sums": self.sums.cpu().clone()}

    def load_state_dict(self, st: dict) -> "SignedLogHistogram":
        if tuple(st["counts"].shape) != tuple(self.counts.shape):
            raise ValueError(f"state has shape {tuple(st['counts'].shape)}, accumulator {tuple(self.counts.shape)}")
        self.counts.copy_(st["counts"])
        self.sums.copy_(st["sums"])
        return self

    def top_mean(self, frac: float = TOP_FRACTION) -> torch.Tensor:
        """[n] float64 mean of x over the top `frac` of the tokens by |x| (NaN before any data)."""
        if not 0 < frac <= 1:
            raise ValueError(f"frac must be in (0, 1], got {frac}")
        c = self.counts.sum(1).double()  # [n, bins] by |x|, both signs
        s = self.sums.sum(1)
        total = c.sum(1)
        k = frac * total  # tokens wanted from the top
        above = c.flip(1).cumsum(1).flip(1) - c  # tokens in strictly higher bins
        take = (k[:, None] - above).clamp_(min=0)
        take = torch.minimum(take, c)  # tokens taken from each bin
        part = torch.where(c > 0, s * take / c.clamp_min(1), torch.zeros_like(s))
        return torch.where(total > 0, part.sum(1) / k.clamp_min(1e-300), torch.full_like(total, float("nan")))

    def large_sign(self, frac: float = TOP_FRACTION) -> torch.Tensor:
        """[n] float64 +1 or -1: the sign of `top_mean(frac)` (+1 where it is >= 0 or NaN; chapter 02's
        `helpers.properties.neuron_stats.SIGN_RULE`)."""
        return torch.where(self.top_mean(frac) < 0, -1.0, 1.0).double()

    def quantile(self, q: float) -> torch.Tensor:
        """[n] float64 approximate `q`-quantile of x: the mean value of the bin where the cumulative
        share reaches `q` (bins ordered from the most negative to the most positive; needs
        `split_sign`)."""
        if self.sides != 2:
            raise ValueError("quantiles need a histogram made with split_sign=True")
        order_c = torch.cat([self.counts[:, 0].flip(1), self.counts[:, 1]], 1).double()
        order_s = torch.cat([self.sums[:, 0].flip(1), self.sums[:, 1]], 1)
        total = order_c.sum(1, keepdim=True)
        cum = order_c.cumsum(1) / total.clamp_min(1)
        idx = (cum < q - 1e-12).sum(1, keepdim=True).clamp_(max=order_c.shape[1] - 1)
        val = order_s.gather(1, idx) / order_c.gather(1, idx).clamp_min(1)
        return torch.where(total[:, 0] > 0, val[:, 0], torch.full_like(total[:, 0], float("nan")))


# --------------------------------------------------------------------------------------------
# Grouped moments: the variance reduction of eq. 4
# --------------------------------------------------------------------------------------------


class GroupedMoments:
    """Streaming per-label sums of `n` variables for `g` binary labels: the grouped moments of eq. 4.

    `update(x, y)` with `x` [tokens, n] activations and `y` [tokens, g] 0/1 labels adds the count
    of each label, and for each variable and label the sum and the sum of squares of x over the
    labelled tokens (`x.T @ y` and `(x*x).T @ y`: one matrix product each), plus the totals;
    with `firing=True` also the count of x > 0 per label (`(x > 0).T @ y`).

    Precision: values are shifted by a per-variable constant (the first batch's mean) before they
    are squared, so the sums of squares do not cancel catastrophically; each batch's products are
    taken in `dtype` (float32 by default: matmul speed, ~1e-7 relative error per batch) and added
    to float64 accumulators across batches. With `dtype=torch.float64` the result agrees with a
    direct pandas computation to ~1e-12. `merge` re-shifts exactly, so accumulators built on
    different shards combine to rounding error.
    """

    def __init__(self, n: int, g: int, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 firing: bool = False):
        self.n, self.g, self.device, self.dtype, self.firing = int(n), int(g), torch.device(device), dtype, firing
        f64 = dict(dtype=torch.float64, device=self.device)
        self.count = 0
        self.shift = torch.zeros(self.n, **f64)
        self.s, self.q, self.fires = torch.zeros(self.n, **f64), torch.zeros(self.n, **f64), torch.zeros(self.n, **f64)
        self.n1 = torch.zeros(self.g, **f64)
        self.s1, self.q1 = torch.zeros(self.n, self.g, **f64), torch.zeros(self.n, self.g, **f64)
        self.f1 = torch.zeros(self.n, self.g, **f64) if firing else None

    @torch.no_grad()
    def update(self, x: torch.Tensor, y: torch.Tensor) -> "GroupedMoments":
        if x.dim() != 2 or x.shape[1] != self.n or y.dim() != 2 or y.shape != (x.shape[0], self.g):
            raise ValueError(f"expected x [tokens, {self.n}] and y [tokens, {self.g}], got {tuple(x.shape)}, {tuple(y.shape)}")
        if x.shape[0] == 0:
            return self
        x = x.to(self.device)
        if self.count == 0:
            self.shift = x.double().mean(0)
        d = (x.double() - self.shift).to(self.dtype)
        yy = y.to(self.device, self.dtype)
        self.count += int(x.shape[0])
        self.s += d.sum(0, dtype=torch.float64)
        self.q += (d * d).sum(0, dtype=torch.float64)
        self.n1 += yy.sum(0, dtype=torch.float64)
        self.s1 += (d.T @ yy).double()
        self.q1 += ((d * d).T @ yy).double()
        if self.firing:
            fire = (x > 0).to(self.dtype)
            self.fires += fire.sum(0, dtype=torch.float64)
            self.f1 += (fire.T @ yy).double()
        return self

    def _reshift(self, new: torch.Tensor) -> None:
        """Express the sums about `new` instead of `self.shift` (exact algebra)."""
        c = new - self.shift  # [n]
        n1 = self.n1[None, :]
        self.q1 += -2 * c[:, None] * self.s1 + c[:, None] ** 2 * n1
        self.s1 -= c[:, None] * n1
        self.q += -2 * c * self.s + c * c * self.count
        self.s -= c * self.count
        self.shift = new.clone()

    def merge(self, other: "GroupedMoments") -> "GroupedMoments":
        if (other.n, other.g, other.firing) != (self.n, self.g, self.firing):
            raise ValueError("cannot merge GroupedMoments of different shapes")
        if other.count == 0:
            return self
        if self.count == 0:
            self.load_state_dict(other.state_dict())
            return self
        o = GroupedMoments(self.n, self.g, self.device, self.dtype, self.firing)
        o.load_state_dict(other.state_dict())
        o._reshift(self.shift)
        self.count += o.count
        for k in ("s", "q", "fires", "n1", "s1", "q1"):
            getattr(self, k).add_(getattr(o, k))
        if self.firing:
            self.f1 += o.f1
        return self

    def state_dict(self) -> dict:
        st = {k: getattr(self, k) for k in ("shift", "s", "q", "fires", "n1", "s1", "q1")}
        return {**{k: v.clone() for k, v in st.items()}, "count": self.count, "n": self.n, "g": self.g,
                "firing": self.firing, "f1": None if self.f1 is None else self.f1.clone()}

    def load_state_dict(self, st: dict) -> None:
        if (st["n"], st["g"], st["firing"]) != (self.n, self.g, self.firing):
            raise ValueError("state of a GroupedMoments of another shape")
        self.count = int(st["count"])
        for k in ("shift", "s", "q", "fires", "n1", "s1", "q1"):
            setattr(self, k, st[k].to(self.device, torch.float64).clone())
        self.f1 = None if st["f1"] is None else st["f1"].to(self.device, torch.float64).clone()

    # ---------------------------------------------------------------- results
    def _sides(self):
        n = float(self.count)
        n1 = self.n1[None, :]
        n0 = n - n1
        s0, q0 = self.s[:, None] - self.s1, self.q[:, None] - self.q1
        return n, n1, n0, s0, q0

    def variance_reduction(self) -> torch.Tensor:
        """[n, g] float64 VR of eq. 4 (NaN where a variable is constant or a label is all 0 or all 1)."""
        n, n1, n0, s0, q0 = self._sides()
        ss = self.q - self.s ** 2 / n
        within1 = torch.where(n1 > 0, self.q1 - self.s1 ** 2 / n1.clamp_min(1), torch.zeros_like(self.q1))
        within0 = torch.where(n0 > 0, q0 - s0 ** 2 / n0.clamp_min(1), torch.zeros_like(q0))
        vr = 1 - (within0 + within1) / ss[:, None]
        bad = (ss[:, None] <= 1e-12 * self.q.clamp_min(1e-300)[:, None]) | (n1 == 0) | (n0 == 0)
        return vr.masked_fill(bad, float("nan"))

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([n, g] mean where the label is 1, [n, g] mean where it is 0), float64."""
        n, n1, n0, s0, _ = self._sides()
        return self.s1 / n1 + self.shift[:, None], s0 / n0 + self.shift[:, None]

    def stds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Population standard deviations on each side of each label, float64 [n, g]."""
        n, n1, n0, s0, q0 = self._sides()
        v1 = (self.q1 / n1 - (self.s1 / n1) ** 2).clamp_min(0)
        v0 = (q0 / n0 - (s0 / n0) ** 2).clamp_min(0)
        return v1.sqrt(), v0.sqrt()

    def firing_information(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mutual information in bits between firing (x > 0) and the label, taken as one
        categorical variable whose values are the labels (they must partition the tokens, as
        position groups do); that MI divided by the entropy of firing), each [n].

        The plug-in MI of counts is biased upwards: for a variable independent of the label its
        expectation is about (G - 1) / (2 N ln 2) bits with G occupied label values and N tokens,
        which is large beside a rarely firing neuron's entropy. The MI is therefore the
        Miller-Madow estimate: each of H(firing), H(label) and H(firing, label) gets its bias
        term (m - 1) / (2 N) nats (m its occupied cells), so the MI loses
        (m_joint - m_firing - m_label + 1) / (2 N) nats; it is clipped at 0."""
        if not self.firing:
            raise ValueError("built without firing=True")
        n = float(self.count)
        pg = (self.n1 / n)[None, :]
        pf = (self.fires / n).clamp(1e-12, 1 - 1e-12)
        pfg = (self.f1 / self.n1.clamp_min(1)[None, :]).clamp(1e-12, 1 - 1e-12)

        def kl(p, q):
            return p * torch.log2(p / q) + (1 - p) * torch.log2((1 - p) / (1 - q))

        plug_in = (pg * kl(pfg, pf[:, None])).sum(1)
        occupied = self.n1 > 0
        m_label = occupied.sum().double()
        m_firing = (self.fires > 0).double() + (self.fires < n).double()
        m_joint = ((self.f1 > 0) & occupied[None, :]).sum(1).double() + ((self.f1 < self.n1[None, :]) & occupied[None, :]).sum(1).double()
        bias = (m_joint - m_firing - m_label + 1) / (2 * n * math.log(2))
        mi = (plug_in - bias).clamp_min(0)
        h = -(pf * torch.log2(pf) + (1 - pf) * torch.log2(1 - pf))
        return mi, torch.where(h > 1e-9, (mi / h).clamp_max(1), torch.zeros_like(mi))

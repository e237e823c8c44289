"""Tests for helpers.correlations.pearson (streaming Pearson, baselines, summaries)."""

import io

import numpy as np
import pytest
import torch

from helpers.correlations.pearson import (
    BlockedStreamingPearson,
    apply_rotation,
    excess_correlation,
    gaussian_rotation,
    global_to_layer_neuron,
    max_correlation,
    mixed_correlation,
    plan_blocks,
    random_rotation,
)
from helpers.streaming.accumulators import StreamingPearson


@pytest.fixture(autouse=True)
def single_thread():
    """The arrays here are small: one thread avoids OpenMP barrier stalls on a busy machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def correlated_data(tokens, n_a, n_b, seed, mean_over_std=100.0, dtype=torch.float32):
    """x [tokens, n_a], y [tokens, n_b] sharing latent factors; |mean| = mean_over_std * std."""
    g = torch.Generator().manual_seed(seed)
    k = 6
    z = torch.randn(tokens, k, generator=g, dtype=torch.float64)
    x = z @ torch.randn(k, n_a, generator=g, dtype=torch.float64) + torch.randn(
        tokens, n_a, generator=g, dtype=torch.float64
    )
    y = z @ torch.randn(k, n_b, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        tokens, n_b, generator=g, dtype=torch.float64
    )
    out = []
    for v in (x, y):
        std = 10 ** torch.empty(v.shape[1], dtype=torch.float64).uniform_(-1, 1, generator=g)
        sign = torch.where(torch.rand(v.shape[1], generator=g) < 0.5, -1.0, 1.0).double()
        v = (v - v.mean(0)) / v.std(0) * std + sign * mean_over_std * std
        out.append(v.to(dtype))
    return out[0], out[1]


def numpy_corr(x, y):
    """float64 NumPy reference [n_a, n_b] from the exact values the accumulator sees.

    Same two-pass math as ``np.corrcoef`` (checked against it below) but via
    einsum, which avoids multi-threaded BLAS stalls on a busy 2-core machine.
    """
    xc = x.double().numpy()
    yc = y.double().numpy()
    xc = xc - xc.mean(0)
    yc = yc - yc.mean(0)
    cov = np.einsum("ti,tj->ij", xc, yc)
    sa = np.sqrt(np.einsum("ti,ti->i", xc, xc))
    sb = np.sqrt(np.einsum("ti,ti->i", yc, yc))
    return cov / sa[:, None] / sb[None, :]


def test_reference_is_np_corrcoef():
    x, y = correlated_data(5000, 7, 5, seed=30)
    full = np.corrcoef(torch.cat([x, y], 1).double().numpy(), rowvar=False)
    np.testing.assert_allclose(numpy_corr(x, y), full[:7, 7:], rtol=0, atol=1e-12)


def uneven_batches(tokens, seed, first=1, high=5000):
    rng = np.random.default_rng(seed)
    bounds = [0, first]
    while bounds[-1] < tokens:
        bounds.append(min(tokens, bounds[-1] + int(rng.integers(1, high))))
    return list(zip(bounds[:-1], bounds[1:]))


def stream(acc, x, y, batches):
    for a, b in batches:
        acc.update(x[a:b], y[a:b])
    return acc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_float64_numpy_with_large_means(dtype):
    tokens = 300_000
    x, y = correlated_data(tokens, 24, 16, seed=0, dtype=dtype)
    ref = numpy_corr(x, y)
    # The first batch is one token, so the shift is a poor mean estimate; a
    # small flush_every exercises many flushes.
    batches = uneven_batches(tokens, 1, high=20_000)
    acc = stream(StreamingPearson(24, 16, flush_every=40_000), x, y, batches)
    assert acc.n_tokens == tokens
    corr = acc.correlation()
    assert corr.dtype == torch.float32 and corr.shape == (24, 16)
    err = np.abs(corr.double().numpy() - ref).max()
    assert err < 1e-4, err
    assert np.abs(ref).max() > 0.5  # the data really are correlated

    # The data are hard: uncentred fp32 sums (the reference algorithm's design)
    # are wrong well beyond the tolerance.
    xf, yf = x.float(), y.float()
    sxy, sx, sy = xf.T @ yf, xf.sum(0), yf.sum(0)
    sxx, syy = (xf * xf).sum(0), (yf * yf).sum(0)
    n = tokens
    cov = sxy.double() / n - torch.outer(sx.double(), sy.double()) / n**2
    va = sxx.double() / n - (sx.double() / n) ** 2
    vb = syy.double() / n - (sy.double() / n) ** 2
    naive = (cov / torch.outer(va.clamp_min(1e-300).sqrt(), vb.clamp_min(1e-300).sqrt())).numpy()
    assert not np.abs(naive - ref).max() < 1e-3


def test_precision_modes_and_input_checks():
    x, y = correlated_data(20_000, 8, 6, seed=3, dtype=torch.float16)
    ref = numpy_corr(x, y)
    fp32 = stream(StreamingPearson(8, 6), x, y, uneven_batches(20_000, 2)).correlation()
    tf32 = stream(StreamingPearson(8, 6, precision="tf32"), x, y, uneven_batches(20_000, 2)).correlation()
    bf16 = stream(StreamingPearson(8, 6, precision="bf16"), x, y, uneven_batches(20_000, 2)).correlation()
    assert np.abs(fp32.double().numpy() - ref).max() < 1e-5
    assert torch.equal(tf32, fp32)  # tf32 only changes CUDA matmuls
    bf16_err = np.abs(bf16.double().numpy() - ref).max()
    assert 1e-5 < bf16_err < 1e-2  # really rounded to bf16, but centred first
    acc = StreamingPearson(8, 6)
    with pytest.raises(ValueError):
        acc.update(x[:, :7], y)
    with pytest.raises(ValueError):
        acc.update(x[:10], y[:11])
    with pytest.raises(ValueError):
        StreamingPearson(8, 6, precision="fp8")
    assert torch.isnan(acc.correlation()).all()  # no data yet
    # Batches longer than chunk_tokens are split internally.
    chunked = StreamingPearson(8, 6, chunk_tokens=777)
    chunked.update(x, y)
    assert np.abs(chunked.correlation().double().numpy() - ref).max() < 1e-5


def test_merge_equals_single_pass_with_different_shifts():
    tokens = 60_000
    x, y = correlated_data(tokens, 12, 10, seed=4)
    single = stream(StreamingPearson(12, 10), x, y, uneven_batches(tokens, 5, first=3000))

    half = tokens // 2
    a = stream(StreamingPearson(12, 10), x[:half], y[:half], uneven_batches(half, 6, first=2000))
    b = stream(StreamingPearson(12, 10), x[half:], y[half:], uneven_batches(half, 7, first=500))
    assert not torch.equal(a.shifts[0], b.shifts[0]) and not torch.equal(a.shifts[1], b.shifts[1])
    merged = StreamingPearson(12, 10).merge(a).merge(b)  # the empty one adopts a's shifts
    assert merged.n_tokens == tokens and a.n_tokens == half  # other is left unchanged
    assert (merged.correlation() - single.correlation()).abs().max() < 1e-6
    ma, mb = merged.means()
    assert torch.allclose(ma, x.double().mean(0), rtol=1e-9, atol=1e-9)
    assert torch.allclose(mb, y.double().mean(0), rtol=1e-9, atol=1e-9)

    # A shard with shifts 5 std away still merges to the right answer.
    c = StreamingPearson(12, 10)
    c.set_shifts(a.shifts[0] + 5 * x.std(0), a.shifts[1] - 5 * y.std(0))
    extra = x[:5000] * 0.5 + 1.0, y[:5000] * 2.0 - 3.0
    c.update(*extra)
    merged.merge(c)
    ref = numpy_corr(torch.cat([x, extra[0]]), torch.cat([y, extra[1]]))
    assert np.abs(merged.correlation().double().numpy() - ref).max() < 1e-5

    with pytest.raises(ValueError):
        StreamingPearson(12, 9).merge(a)


def test_merge_recentring_is_exact():
    """Integer data and integer shifts make every fp32 product exact, so only the
    float64 merge algebra is left: merged must equal a single pass to ~1e-12."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-4, 5, (3000, 5), generator=g).float() + torch.arange(5) * 100
    y = torch.randint(-4, 5, (3000, 4), generator=g).float() - 250
    y[:, 1] += x[:, 0]
    shards = []
    for k, (lo, hi) in enumerate([(0, 1000), (1000, 1700), (1700, 3000)]):
        acc = StreamingPearson(5, 4)
        acc.set_shifts(torch.arange(5) * 100.0 + 7 * k - 3, torch.full((4,), -250.0 + 11 * k))
        shards.append(stream(acc, x, y, [(lo, lo + 300), (lo + 300, hi)]))
    single = StreamingPearson(5, 4)
    single.set_shifts(torch.arange(5) * 100.0, torch.full((4,), -250.0))
    stream(single, x, y, [(0, 3000)])
    merged = shards[0].merge(shards[1]).merge(shards[2])
    c1, c2 = merged.correlation(torch.float64), single.correlation(torch.float64)
    assert (c1 - c2).abs().max() < 1e-12
    assert np.abs(c1.numpy() - numpy_corr(x, y)).max() < 1e-12


def test_state_dict_resume_equals_uninterrupted():
    tokens = 50_000
    x, y = correlated_data(tokens, 10, 7, seed=9, dtype=torch.float16)
    batches = uneven_batches(tokens, 10, first=500, high=3000)
    kwargs = dict(flush_every=12_000)
    full = stream(StreamingPearson(10, 7, **kwargs), x, y, batches)

    cut = len(batches) // 2 + 1
    first = stream(StreamingPearson(10, 7, **kwargs), x, y, batches[:cut])
    assert first.state_dict()["block_updates"] > 0  # checkpoint mid-block
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    del first
    buf.seek(0)
    resumed = StreamingPearson(10, 7)  # settings come back from the state
    resumed.load_state_dict(torch.load(buf))
    stream(resumed, x, y, batches[cut:])

    assert resumed.n_tokens == full.n_tokens == tokens
    assert (resumed.correlation() - full.correlation()).abs().max() < 1e-6
    assert torch.equal(resumed.state_dict()["sxy"], full.state_dict()["sxy"])
    with pytest.raises(ValueError):
        StreamingPearson(10, 8).load_state_dict(full.state_dict())


def test_dead_variables_are_nan_and_flagged():
    x, y = correlated_data(30_000, 6, 5, seed=11, dtype=torch.float16)
    x[:, 3] = 3.5
    y[:, 0] = 0.0
    y[:, 2] = -7.25
    acc = stream(StreamingPearson(6, 5), x, y, uneven_batches(30_000, 12, first=1000))
    corr = acc.correlation()
    assert acc.dead_a().tolist() == [False, False, False, True, False, False]
    assert acc.dead_b().tolist() == [True, False, True, False, False]
    nan = torch.isnan(corr)
    expected = torch.zeros(6, 5, dtype=torch.bool)
    expected[3, :] = True
    expected[:, [0, 2]] = True
    assert torch.equal(nan, expected)
    live_x, live_y = [0, 1, 2, 4, 5], [1, 3, 4]
    ref = numpy_corr(x[:, live_x], y[:, live_y])
    assert np.abs(corr[live_x][:, live_y].double().numpy() - ref).max() < 1e-5
    vals, idx = max_correlation(corr)
    assert torch.isnan(vals[3]) and idx[3] == -1
    assert not torch.isnan(vals[[0, 1, 2, 4, 5]]).any()


def test_random_rotation_properties():
    torch.manual_seed(0)
    r1 = random_rotation(64, seed=5)
    torch.manual_seed(123)
    _ = torch.randn(10)
    r2 = random_rotation(64, seed=5)
    r3 = random_rotation(64, seed=6)
    assert r1.shape == (64, 64) and r1.dtype == torch.float32
    assert (r1 @ r1.T - torch.eye(64)).abs().max() < 1e-5
    assert (r1.T @ r1 - torch.eye(64)).abs().max() < 1e-5
    assert torch.equal(r1, r2)
    assert (r1 - r3).abs().max() > 0.1
    # Does not consume the global RNG.
    torch.manual_seed(7)
    a = torch.rand(3)
    torch.manual_seed(7)
    random_rotation(16, seed=1)
    gaussian_rotation(16, seed=1)
    assert torch.equal(a, torch.rand(3))
    # Haar sign correction: diagonal of a Haar matrix is symmetric about 0.
    diag = torch.stack([random_rotation(8, seed=s).diagonal() for s in range(200)])
    assert abs(diag.mean().item()) < 0.05

    g = gaussian_rotation(64, seed=5, dtype=torch.float64)
    assert torch.allclose(g.norm(dim=1), torch.ones(64, dtype=torch.float64), atol=1e-12)
    assert torch.equal(g, gaussian_rotation(64, seed=5, dtype=torch.float64))
    assert (g @ g.T - torch.eye(64, dtype=torch.float64)).abs().max() > 0.05  # not orthogonal

    acts = torch.randn(10, 64).half()
    rotated = apply_rotation(acts, r1)
    assert rotated.dtype == torch.float32 and rotated.shape == (10, 64)
    j = 17
    assert torch.allclose(rotated[:, j], (acts.float() * r1[j][None, :]).sum(1), atol=1e-5)


def test_global_index_to_layer_neuron():
    sizes = [4, 0, 3, 5]
    assert global_to_layer_neuron(0, sizes) == (0, 0)
    assert global_to_layer_neuron(4, sizes) == (2, 0)
    assert global_to_layer_neuron(11, sizes) == (3, 4)
    assert global_to_layer_neuron(-1, sizes) == (-1, -1)
    layer, neuron = global_to_layer_neuron(torch.tensor([0, 3, 4, 6, 7, 11, -1]), sizes)
    assert layer.tolist() == [0, 0, 2, 2, 3, 3, -1]
    assert neuron.tolist() == [0, 3, 0, 2, 0, 4, -1]
    with pytest.raises(ValueError):
        global_to_layer_neuron(12, sizes)


def test_planted_universal_neurons_found_and_excess_is_large():
    g = torch.Generator().manual_seed(2024)
    tokens, layers, d = 20_000, 2, 128
    sizes = [d] * layers
    n = layers * d

    def acts():
        return torch.nn.functional.gelu(torch.randn(tokens, n, generator=g) * 1.5 + 0.3)

    ref = acts()
    planted = [3, 50, 130, 200, 255]
    others, where = [], []
    for _ in range(3):
        m = acts()
        pos = torch.randperm(n, generator=g)[: len(planted)]
        for i, p in zip(planted, pos.tolist()):
            m[:, p] = ref[:, i] + 0.1 * ref[:, i].std() * torch.randn(tokens, generator=g)
        others.append(m.half())
        where.append(pos.tolist())
    ref = ref.half()

    def max_corr_against(other):
        acc = StreamingPearson(n, n)
        for a, b in uneven_batches(tokens, 3, first=2048, high=4096):
            acc.update(ref[a:b], other[a:b])
        return max_correlation(acc.correlation(), sizes)

    maxes, baselines = [], []
    for k, m in enumerate(others):
        vals, idx = max_corr_against(m)
        for i, p in zip(planted, where[k]):
            assert vals[i] > 0.95
            assert global_to_layer_neuron(int(idx[i]), sizes) == (p // d, p % d)
        rotated = torch.cat(
            [
                apply_rotation(m[:, l * d : (l + 1) * d], random_rotation(d, seed=100 * k + l))
                for l in range(layers)
            ],
            dim=1,
        )
        base, _ = max_corr_against(rotated)
        maxes.append(vals)
        baselines.append(base)

    excess = excess_correlation(torch.stack(maxes, 1), torch.stack(baselines, 1))
    assert excess.shape == (n,)
    independent = torch.ones(n, dtype=torch.bool)
    independent[planted] = False
    assert (excess[planted] > 0.5).all(), excess[planted]
    assert excess[independent].abs().max() < 0.1
    # Baselines are not trivially zero: a rotated planted neuron still leaks.
    assert (torch.stack(baselines, 1)[planted] > 0.1).all()


def test_excess_correlation_nan_aware():
    mc = torch.tensor([[0.9, 0.8, float("nan")], [float("nan")] * 3, [0.2, 0.3, 0.4]])
    mb = torch.tensor([[0.3, 0.2, 0.1], [0.1, 0.1, 0.1], [0.2, 0.3, 0.5]])
    ex = excess_correlation(mc, mb)
    assert torch.allclose(ex[0], torch.tensor(0.6))
    assert torch.isnan(ex[1])
    assert torch.allclose(ex[2], torch.tensor(-0.1 / 3))
    with pytest.raises(ValueError):
        excess_correlation(mc, mb[:2])


def test_block_plan_and_blocked_equals_unblocked():
    n_a, n_b, bt = 40, 24, 64
    small = plan_blocks(n_a, n_b, memory_budget_bytes=25_000, batch_tokens=bt)
    assert small.n_blocks >= 3 and small.passes == small.n_blocks
    assert small.bytes_per_block <= 25_000 < small.bytes_full
    slices = small.row_slices()
    assert slices[0].start == 0 and slices[-1].stop == n_a and len(slices) == small.n_blocks
    assert "blocks" in str(small)
    assert plan_blocks(n_a, n_b, 1e9).n_blocks == 1
    with pytest.raises(ValueError):
        plan_blocks(n_a, n_b, 100)

    # GPT2-medium all pairs: 38.7 GB fp32 block alone; must be blocked on 80 GB.
    med = plan_blocks(98_304, 98_304, 80e9)
    assert abs(98_304**2 * 4 / 1e9 - 38.65) < 0.01
    assert med.bytes_full > 80e9 and med.n_blocks == 3 and med.rows_per_block == 32_768
    assert med.bytes_per_block <= 80e9

    tokens = 4_000
    x, y = correlated_data(tokens, n_a, n_b, seed=21, dtype=torch.float16)
    x[:, 5] = 1.0
    batches = uneven_batches(tokens, 22, first=64, high=bt)

    def make_batches():
        return ((x[a:b], y[a:b]) for a, b in batches)

    blocked = BlockedStreamingPearson(n_a, n_b, 25_000, batch_tokens=bt)
    assert blocked.plan.n_blocks == small.n_blocks
    corr_blocked = blocked.compute(make_batches)
    unblocked = stream(StreamingPearson(n_a, n_b), x, y, batches)
    diff = (corr_blocked - unblocked.correlation()).abs()
    assert torch.equal(torch.isnan(corr_blocked), torch.isnan(unblocked.correlation()))
    assert diff.nan_to_num(0.0).max() < 1e-6
    assert torch.equal(blocked.dead_a, unblocked.dead_a())
    assert torch.equal(blocked.dead_b, unblocked.dead_b())
    assert blocked.n_tokens == tokens


@pytest.mark.parametrize("make_mix", [random_rotation, gaussian_rotation])
def test_mixed_correlation_equals_streaming_the_mixed_units(make_mix):
    """The rotation baseline from covariances equals correlating against R @ y directly."""
    tokens, n_a, n_b = 3_000, 9, 14
    x, y = correlated_data(tokens, n_a, n_b, seed=31, mean_over_std=30.0)
    x[:, 2] = 4.0  # dead x
    y[:, 6] = -1.5  # a dead unit inside the mixed layer
    cols = slice(3, 11)
    mix = make_mix(8, 5)
    z = apply_rotation(y[:, cols], mix)
    cross, gram = StreamingPearson(n_a, n_b), StreamingPearson(8, 8)
    direct = StreamingPearson(n_a, 8)
    for a in range(0, tokens, 700):
        b = min(tokens, a + 700)
        cross.update(x[a:b], y[a:b])
        gram.update(y[a:b, cols], y[a:b, cols])
        direct.update(x[a:b], z[a:b])
    got = mixed_correlation(cross, cols, gram, mix)
    assert got.shape == (n_a, 8)
    assert torch.isnan(got[2]).all() and not torch.isnan(got[[0, 1, 3]]).any()
    with np.errstate(invalid="ignore", divide="ignore"):  # the dead x row
        ref = numpy_corr(x, z)
    ok = ~np.isnan(ref)
    assert np.abs(got.numpy()[ok] - ref[ok]).max() < 1e-5
    assert (got - direct.correlation()).nan_to_num().abs().max() < 1e-5
    assert got.abs().nan_to_num().max() > 0.2  # not trivially small

    with pytest.raises(ValueError, match="same batches"):
        short = StreamingPearson(8, 8)
        short.update(y[:100, cols], y[:100, cols])
        mixed_correlation(cross, cols, short, mix)
    with pytest.raises(ValueError, match="mix must be"):
        mixed_correlation(cross, cols, gram, mix[:, :5])


def test_cpu_prologue_slices_do_not_change_the_result():
    x, y = correlated_data(1_000, 7, 5, seed=41)
    one = StreamingPearson(7, 5, prologue_tokens=10_000)
    sliced = StreamingPearson(7, 5, prologue_tokens=17)
    for acc in (one, sliced):
        acc.update(x[:600], y[:600])
        acc.update(x[600:], y[600:])
    assert (one.correlation() - sliced.correlation()).abs().max() < 1e-6
    assert torch.allclose(one.means()[0], sliced.means()[0], rtol=1e-12, atol=1e-9)
    with pytest.raises(ValueError, match="prologue_tokens"):
        StreamingPearson(3, 3, prologue_tokens=0)

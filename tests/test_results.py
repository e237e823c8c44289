"""Results and checkpoints that cannot silently be wrong: content-keyed caches, resume by row
offset, damaged and stale files named in one line, the preset reaching the command line, and the
streaming driver's token metadata lined up with the activations."""
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.core import cache as artifacts
from helpers.correlations import correlate
from helpers.properties import neuron_stats
from helpers.streaming.activations import ActivationStream
from helpers.core.cache import DamagedFile, IdentityMismatch, cached_result, read_json, run_cli
from helpers.data.tokens import TokenRows, cached_token_rows, load_token_rows
from helpers.models.families import Family
from helpers.models.loading import init_model, load_model, save_model

from test_correlate import planted_family


def same(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-6) -> None:
    num = a.select_dtypes("number").columns
    assert list(a.columns) == list(b.columns)
    np.testing.assert_allclose(a[num].to_numpy(float), b[num].to_numpy(float), rtol=0, atol=atol, equal_nan=True)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    torch.manual_seed(0)
    fam, _ = planted_family(3)
    clean_dir = tmp_path_factory.mktemp("clean")
    clean = correlate.correlate_family(fam, 0, clean_dir, batch_size=20, verbose=False).table("universality")
    return fam, clean, clean_dir


def kill_after_first_checkpoint(fam, out, monkeypatch, batch_size):
    real = artifacts.save_checkpoint

    def save_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt("killed after a checkpoint")

    monkeypatch.setattr("helpers.streaming.activations.save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        correlate.correlate_family(fam, 0, out, batch_size=batch_size, checkpoint_every=500, verbose=False)
    monkeypatch.setattr("helpers.streaming.activations.save_checkpoint", real)


def test_resume_with_another_batch_size_gives_the_clean_table(planted, tmp_path, monkeypatch):
    fam, clean, clean_dir = planted
    kill_after_first_checkpoint(fam, tmp_path / "run", monkeypatch, batch_size=20)
    st = torch.load(tmp_path / "run" / "state_block0_rank0.pt", weights_only=False)["state"]
    assert st["rows_done"] == 40 and st["tokens_done"] == 40 * 16  # 2 batches of 20 rows: 570 >= 500 tokens
    resumed = correlate.correlate_family(fam, 0, tmp_path / "run", batch_size=32, verbose=False).table("universality")
    same(resumed, clean)
    run = read_json(tmp_path / "run" / "run.json")
    assert run["n_valid_tokens"] == read_json(clean_dir / "run.json")["n_valid_tokens"] == 300 * 15


def test_truncated_checkpoint_is_named_and_the_run_starts_fresh(planted, tmp_path, monkeypatch, capsys):
    fam, clean, _ = planted
    kill_after_first_checkpoint(fam, tmp_path / "run", monkeypatch, batch_size=20)
    ckpt = tmp_path / "run" / "state_block0_rank0.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    table = correlate.correlate_family(fam, 0, tmp_path / "run", batch_size=20, verbose=False).table("universality")
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{ckpt}: damaged checkpoint, unreadable (RuntimeError); deleting it and starting fresh"]
    same(table, clean)


def test_truncated_or_corrupted_result_is_named_and_recomputed(planted, tmp_path, capsys):
    fam, clean, clean_dir = planted
    shutil.copytree(clean_dir, tmp_path / "run")
    table_file = tmp_path / "run" / "universality.parquet"
    size = table_file.stat().st_size
    table_file.write_bytes(table_file.read_bytes()[: size // 2])
    same(correlate.correlate_family(fam, 0, tmp_path / "run", batch_size=20, verbose=False).table("universality"), clean)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{table_file}: {size // 2:,} bytes, recorded {size:,}")
    assert err[0].endswith("recomputing correlations")
    # same size, one byte changed: the checksum catches it
    data = bytearray(table_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    table_file.write_bytes(bytes(data))
    same(correlate.correlate_family(fam, 0, tmp_path / "run", batch_size=20, verbose=False).table("universality"), clean)
    assert "sha256 differs from the recorded one" in capsys.readouterr().err
    # a parquet read without a record is still named in one line
    with pytest.raises(DamagedFile, match=r"universality.parquet: unreadable parquet .*delete it to recompute"):
        table_file.write_bytes(b"PAR1 not really")
        artifacts.read_parquet(table_file)


def test_stale_out_is_refused_naming_the_fields(planted, tmp_path):
    fam, _, clean_dir = planted
    shutil.copytree(clean_dir, tmp_path / "out")
    with pytest.raises(IdentityMismatch, match=r"made with another baseline_seed, threshold: delete that folder"):
        correlate.correlate_family(fam, 0, tmp_path / "out", seed=1, threshold=0.3, verbose=False)


def cli_setup(monkeypatch, tmp_path, fam, **preset):
    """A preset file for the planted family (its tokens come from the family, whatever `n_tokens`
    says); `load_family` returns the planted family."""
    from conftest import write_preset_file

    import helpers.correlations.correlate

    monkeypatch.setattr(helpers.correlations.correlate, "load_family", lambda name, params, device="cpu": fam)
    return write_preset_file(tmp_path, family="planted", n_tokens=1, artifacts_dir=str(tmp_path / "art"), batch_size=50,
                             baseline_seed=0, **preset)


def test_the_presets_threshold_reaches_the_table(planted, tmp_path, monkeypatch, capsys):
    fam, clean, _ = planted
    path = cli_setup(monkeypatch, tmp_path, fam, threshold=0.9, baseline="rotation", reference="a")
    correlate.main(["--preset", str(path), "--out", str(tmp_path / "p")])
    run = read_json(tmp_path / "p" / "run.json")
    table = pd.read_parquet(tmp_path / "p" / "universality.parquet")
    assert run["threshold"] == 0.9 and run["batch_size"] == 50
    assert (table.is_universal == (table.excess_corr > 0.9)).all()
    assert table.is_universal.sum() < clean.is_universal.sum()  # the planted neurons' excess is between 0.5 and 0.9
    assert "(threshold 0.9)" in capsys.readouterr().out
    correlate.main(["--preset", str(path), "--out", str(tmp_path / "f"), "--threshold", "0.5"])  # a flag overrides the preset
    assert read_json(tmp_path / "f" / "run.json")["threshold"] == 0.5
    # the default cache folder is keyed by the preset's threshold too
    correlate.main(["--preset", str(path)])
    monkeypatch.setattr(correlate, "_correlate", lambda *a, **k: pytest.fail("the preset's run was not where expected"))
    res = correlate.correlate_family(fam, 1, reference="a", threshold=0.9, artifacts_dir=tmp_path / "art")
    assert res.path.parent == tmp_path / "art" / "correlations" and res.meta["threshold"] == 0.9


def test_the_command_line_reads_the_rows_and_builds_the_identity_once(planted, tmp_path, monkeypatch):
    fam, _, _ = planted
    path = cli_setup(monkeypatch, tmp_path, fam)
    calls = {"rows": 0, "identity": 0}
    rows, identity = fam.rows_factory, correlate.correlation_identity

    def counted_rows(*a):
        calls["rows"] += 1
        return rows(*a)

    def counted_identity(*a, **k):
        calls["identity"] += 1
        return identity(*a, **k)

    monkeypatch.setattr(fam, "rows_factory", counted_rows)
    monkeypatch.setattr(correlate, "correlation_identity", counted_identity)
    correlate.main(["--preset", str(path)])  # computed
    correlate.main(["--preset", str(path)])  # found in the cache
    assert calls == {"rows": 2, "identity": 2}


def test_cli_errors_are_one_line_unless_debug(planted, tmp_path, monkeypatch, capsys):
    fam, _, clean_dir = planted
    path = cli_setup(monkeypatch, tmp_path, fam, threshold=0.7)
    shutil.copytree(clean_dir, tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        run_cli(correlate.main, ["--preset", str(path), "--out", str(tmp_path / "out")])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made with another" in err[0] and "threshold" in err[0] and "--debug" in err[0]
    monkeypatch.delenv(artifacts.DEBUG_ENV, raising=False)
    with pytest.raises(IdentityMismatch):
        run_cli(correlate.main, ["--preset", str(path), "--out", str(tmp_path / "out"), "--debug"])


def test_moved_artifacts_reuse_every_result(planted, tmp_path, monkeypatch):
    fam, clean, _ = planted
    first = correlate.correlate_family(fam, 0, batch_size=20, verbose=False, artifacts_dir=tmp_path / "here")
    shutil.copytree(tmp_path / "here", tmp_path / "elsewhere" / "artifacts")
    monkeypatch.setattr(correlate, "_correlate", lambda *a, **k: pytest.fail("recomputed a moved result"))
    moved = correlate.correlate_family(fam, 0, batch_size=20, verbose=False, artifacts_dir=tmp_path / "elsewhere" / "artifacts")
    assert moved.path.name == first.path.name and moved.path.parent.parent == tmp_path / "elsewhere" / "artifacts"
    same(moved.table("universality"), clean)


def test_embedded_identities_hold_no_path(tmp_path):
    from helpers.models.families import FamilyNotTrained, load_family
    from helpers.core.presets import load_preset

    params = load_preset("smoke")
    try:
        fam = load_family("embedded", params)
    except FamilyNotTrained:
        pytest.skip("the smoke family is not trained here: python -m helpers.models.training --preset smoke")
    ident = json.dumps([correlate.correlation_identity(fam, 2000), neuron_stats.stats_identity(fam, fam.reference, 2000)])
    assert str(params.artifacts_path) not in ident and "/" not in ident.replace("\\/", "")
    assert fam.token_table(2000).sha256 in ident


def test_corrupted_token_rows_are_detected_and_rebuilt(tmp_path, capsys):
    built = []

    def build():
        built.append(1)
        return TokenRows(torch.arange(12).reshape(3, 4), torch.arange(12).reshape(3, 4) + 100, torch.zeros(3, 4, dtype=torch.long), ["x"])

    ident = {"source": "test", "n": 3}
    first = cached_token_rows(tmp_path, ident, build)
    again = cached_token_rows(tmp_path, ident, build)
    assert len(built) == 1 and torch.equal(first.ids, again.ids) and first.sha256 == again.sha256
    assert torch.equal(again.gpt2_ids, first.ids + 100) and again.label_names == ["x"]
    f = next((tmp_path / "token_rows").glob("test-*/rows.npz"))
    f.write_bytes(f.read_bytes()[:-10])
    rebuilt = cached_token_rows(tmp_path, ident, build)
    assert len(built) == 2 and torch.equal(rebuilt.ids, first.ids)
    assert f"{f}: " in capsys.readouterr().err
    assert torch.equal(load_token_rows(f).ids, first.ids)


def test_cached_result_records_identity_and_files(tmp_path):
    calls = []

    def compute(folder):
        calls.append(1)
        artifacts.write_json(folder / "x.json", {"v": 1})
        (folder / "state.pt").write_bytes(b"checkpoint")  # checkpoints are not part of a result
        return {"note": "m"}

    res = cached_result("demo", {"a": 1}, compute, root=tmp_path, prefix="p")
    assert res.path == tmp_path / "demo" / f"p-{artifacts.identity_key({'a': 1})}"
    assert set(res.files) == {"x.json"} and res.meta == {"note": "m"}
    rec = artifacts.read_json(res.path / artifacts.RESULT_FILE)
    assert rec["identity"] == {"a": 1} and rec["files"]["x.json"]["size"] == (res.path / "x.json").stat().st_size
    assert cached_result("demo", {"a": 1}, compute, root=tmp_path, prefix="p").meta == {"note": "m"} and len(calls) == 1
    with pytest.raises(IdentityMismatch, match="another a"):
        cached_result("demo", {"a": 2}, compute, folder=res.path)


# A process that waits for `go`, then asks for one result whose compute takes a second and counts
# its runs; it prints the result's metadata.
RACER = """
import json, os, sys, time
from pathlib import Path
from helpers.core.cache import cached_result, write_json

root, name = Path(sys.argv[1]), sys.argv[2]
(root / f"ready-{name}").touch()
while not (root / "go").exists():
    time.sleep(0.01)

def compute(folder):
    with open(root / "runs.txt", "a") as f:
        f.write(name + "\\n")
    time.sleep(1.0)
    write_json(folder / "x.json", {"by": name})
    return {"by": name}

print(json.dumps(cached_result("demo", {"a": 1}, compute, root=root / "artifacts").meta))
"""


def test_two_processes_asking_for_one_result_compute_it_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(artifacts.__file__).parents[1])}
    env.pop("WORLD_SIZE", None)
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), name], env=env, stdout=subprocess.PIPE, text=True)
             for name in ("first", "second")]
    deadline = time.time() + 30
    while not all((tmp_path / f"ready-{n}").exists() for n in ("first", "second")) and time.time() < deadline:
        time.sleep(0.01)
    (tmp_path / "go").touch()  # both are running: they ask at the same moment
    metas = [json.loads(p.communicate(timeout=30)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    runs = (tmp_path / "runs.txt").read_text().split()
    assert len(runs) == 1, f"computed {len(runs)} times: {runs}"
    assert metas[0] == metas[1] == {"by": runs[0]}


def test_a_failed_compute_releases_the_lock(tmp_path):
    def fail(folder):
        raise RuntimeError("compute failed")

    with pytest.raises(RuntimeError, match="compute failed"):
        cached_result("demo", {"a": 1}, fail, root=tmp_path)
    folder = artifacts.result_dir(tmp_path, "demo", {"a": 1})
    with open(folder / artifacts.LOCK_FILE) as f:  # another open file: blocked while the lock is held
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(f, fcntl.LOCK_UN)
    res = cached_result("demo", {"a": 1}, lambda o: artifacts.write_json(o / "x.json", {}) or {"ok": 1}, root=tmp_path)
    assert res.meta == {"ok": 1} and set(res.files) == {"x.json"}


def test_truncated_weights_name_the_file(tmp_path, tiny_arch):
    save_model(init_model(tiny_arch, seed=0), tmp_path / "m", tiny_arch)
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(DamagedFile, match=r"model.safetensors: damaged weights, unreadable .*delete the model's folder"):
        load_model(tmp_path / "m")


def test_driver_metadata_lines_up_with_activations(tiny_arch):
    """Hand-built rows: GPT-2 ids are model ids + 1000, labels the row's parity, two dropped ids.
    The embedding hook is W_E[model id] and the positional one W_pos[position], so each valid
    activation row identifies its token and position."""
    model = init_model(tiny_arch, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, tiny_arch["d_vocab"], (7, tiny_arch["n_ctx"]), generator=g)
    ids[:, 0] = 0
    ids[1, 5] = ids[4, 2] = 1  # dropped like a newline
    rows = TokenRows(ids, ids + 1000, (torch.arange(7) % 2)[:, None].expand(-1, tiny_arch["n_ctx"]).clone(), ["even", "odd"])
    hooks = ["hook_embed", "hook_pos_embed", "blocks.0.attn.hook_pattern", "ln_final.hook_scale"]
    stream = ActivationStream({"m": model}, rows, hooks, 3, [0, 1], lambda: {}, verbose=False)
    seen_rows, n = [], 0
    for batch in stream:
        acts = batch.acts["m"]
        valid_ids = batch.valid(batch.ids)
        assert torch.equal(batch.valid(batch.gpt2_ids), valid_ids + 1000)
        assert torch.equal(batch.valid(batch.labels), batch.valid(torch.arange(batch.rows.start, batch.rows.stop)[:, None]
                                                                  .expand_as(batch.ids)) % 2)
        assert torch.allclose(acts["hook_embed"], model.W_E[valid_ids])
        assert torch.allclose(acts["hook_pos_embed"], model.W_pos[batch.valid(batch.positions)])
        assert acts["blocks.0.attn.hook_pattern"].shape == (len(batch.ids), tiny_arch["n_heads"], tiny_arch["n_ctx"], tiny_arch["n_ctx"])
        assert acts["ln_final.hook_scale"].shape == (batch.n_tokens, 1)
        assert not (valid_ids <= 1).any()
        seen_rows.append((batch.rows.start, batch.rows.stop))
        n += batch.n_tokens
    assert seen_rows == [(0, 3), (3, 6), (6, 7)]
    assert n == stream.n_tokens == 7 * (tiny_arch["n_ctx"] - 1) - 2


def test_neuron_stats_resume_with_another_batch_size(tmp_path, monkeypatch):
    from test_neuron_stats import token_rows, tiny_model

    model, rows, drop = tiny_model(), token_rows(), [0, 5]
    clean = neuron_stats.neuron_stats_table(model, rows, drop, tmp_path / "clean", batch_size=4, verbose=False)
    real = artifacts.save_checkpoint

    def save_then_die(*a, **k):
        real(*a, **k)
        raise KeyboardInterrupt

    monkeypatch.setattr("helpers.streaming.activations.save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        neuron_stats.neuron_stats_table(model, rows, drop, tmp_path / "run", batch_size=4, checkpoint_every=40, verbose=False)
    monkeypatch.setattr("helpers.streaming.activations.save_checkpoint", real)
    resumed = neuron_stats.neuron_stats_table(model, rows, drop, tmp_path / "run", batch_size=7, verbose=False)
    # batches of 7 rows round differently from batches of 4 in the forward pass (fp32): ~1e-8
    pd.testing.assert_frame_equal(resumed, clean, rtol=1e-5, atol=1e-6)
    assert read_json(tmp_path / "run" / "run.json")["n_valid_tokens"] == \
        read_json(tmp_path / "clean" / "run.json")["n_valid_tokens"]


# Functions that call cached_result but hand back what they load, not the Result: data and weights
# the analyses read (token rows, syntax labels), and the internals of the statistics pass (its
# per-prefix writer, its table computation, and `neuron_stats_table`, the explicit-folder form of
# `member_neuron_stats`). `explain_sampled` returns `Explanations`, which carries its Result.
LOADERS = {"cached_token_rows", "cached_syntax_labels", "_compute_table", "writer", "neuron_stats_table",
           "explain_sampled"}


def test_every_cached_analysis_returns_its_result():
    """A cached job returns the Result (tables, metadata, files), so no caller re-finds a cache path:
    every function under src/helpers that calls cached_result is annotated `-> Result`, or is one
    of the listed loaders."""
    import ast

    src = Path(__file__).resolve().parents[1] / "src" / "helpers"
    found, wrong = set(), []
    for path in sorted(src.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef) or node.name == "cached_result":
                continue
            if any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "cached_result" for n in ast.walk(node)):
                found.add(node.name)
                returns = ast.unparse(node.returns) if node.returns else None
                if node.name not in LOADERS and returns != "Result":
                    wrong.append(f"{path.relative_to(src)}:{node.lineno} {node.name} -> {returns}")
    assert not wrong, "cached jobs that do not return their Result: " + "; ".join(wrong)
    assert {"correlate_family", "next_token_conditioning", "member_vocab_moments", "cached_sweep", "explain_model",
            "score_only", "cached_ablations", "attention_deactivation", "member_neuron_stats"} <= found
    assert LOADERS <= found, f"listed loaders that no longer call cached_result: {sorted(LOADERS - found)}"

import pytest

TINY_ARCH = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "d_vocab": 97}


@pytest.fixture
def tiny_arch():
    return dict(TINY_ARCH)


@pytest.fixture
def offline(monkeypatch):
    """Make the hub look unreachable, as it is on the machines this book is built on."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def smoke_params(tmp_path):
    """The smoke preset with its artifacts in `tmp_path`: the repository's built smoke corpus and
    Debian packages are linked in (built by `make test` before pytest); nothing else is shared."""
    import os
    from pathlib import Path

    from helpers.core.presets import load_preset
    from helpers.data.corpus import preset_corpus

    params = load_preset("smoke")
    shared = params.artifacts_path
    preset_corpus(params, verbose=False)
    for sub in ("corpus", "debs"):
        if (shared / sub).is_dir():
            os.symlink(shared / sub, Path(tmp_path) / sub)
    return params.replace(artifacts_dir=str(tmp_path))


def write_preset_file(folder, **overrides):
    """A preset file in `folder` (named `custom.yaml`): the smoke preset with `overrides` applied
    (a lowered `n_tokens` lowers the sizes read from it), for command-line tests that pass
    `--preset <file>`."""
    import yaml

    from helpers.core.presets import load_preset

    data = {k: v for k, v in load_preset("smoke", **overrides).to_dict().items() if k != "preset"}
    path = folder / "custom.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def sweep_both_ways(monkeypatch):
    """fn(model, rows, targets, drop_ids, extra=None) -> the entropy sweep run with and without the
    last-layer shortcut, asserted to give the same table (metrics to 2e-4), and {shortcut: the
    layers `intervened_logits` (a full forward pass) was called for}."""
    import numpy as np
    import pandas as pd

    from helpers.entropy import interventions as iv

    def run(model, rows, targets, drop_ids, extra=None, batch_size=2):
        calls, tables = {True: set(), False: set()}, {}
        full = iv.intervened_logits
        for shortcut in (True, False):
            def counting(model_, tokens, specs, *a, _seen=calls[shortcut], **k):
                _seen.update(l for l, _, _ in specs)
                return full(model_, tokens, specs, *a, **k)

            monkeypatch.setattr(iv, "intervened_logits", counting)
            tables[shortcut] = iv.intervention_sweep(model, rows, targets, drop_ids, batch_size=batch_size,
                                                     verbose=False, shortcut=shortcut, extra_metrics=extra)
        monkeypatch.setattr(iv, "intervened_logits", full)
        key = ["row", "layer", "neuron", "mode", "grid"]
        a, b = (t.sort_values(key).reset_index(drop=True) for t in (tables[True], tables[False]))
        pd.testing.assert_frame_equal(a[key + ["n"]], b[key + ["n"]])
        cols = iv.metric_columns(a)
        np.testing.assert_allclose(a[cols].to_numpy(), b[cols].to_numpy(), rtol=2e-4, atol=2e-4)
        return tables, calls

    return run

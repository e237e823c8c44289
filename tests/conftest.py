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

    from helpers.data.corpus import build_corpus
    from helpers.core.presets import load_preset, resolve_dir

    params = load_preset("smoke")
    shared = resolve_dir(params.get("artifacts_dir", "artifacts"))
    build_corpus(params.get("corpus", {}), shared, verbose=False)
    for sub in ("corpus", "debs"):
        if (shared / sub).is_dir():
            os.symlink(shared / sub, Path(tmp_path) / sub)
    return {**dict(params), "artifacts_dir": str(tmp_path)}

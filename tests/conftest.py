import pytest

TINY_ARCH = {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 16, "d_vocab": 97}


@pytest.fixture
def tiny_arch():
    return dict(TINY_ARCH)


@pytest.fixture
def offline(monkeypatch):
    """Make the hub look unreachable, as it is on the machines this book is built on."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

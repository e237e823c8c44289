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

"""The shipped family: exported with a manifest, loaded offline without training, checked byte by
byte and by validation loss; a damaged file is named, never loaded, never retrained over."""
import json

import pytest
import torch

from helpers.models import families, training as train, weights


@pytest.fixture
def shipped(smoke_params, tmp_path, monkeypatch):
    """The smoke family, trained into tmp_path and shipped to tmp_path/weights/embedded-smoke."""
    monkeypatch.setattr(weights, "shipped_root", lambda: tmp_path / "weights")
    families.load_family("embedded", smoke_params, train=True)
    out = weights.ship_family(smoke_params, tmp_path / "weights" / "embedded-smoke", "python -m helpers.models.training --preset smoke --ship X")
    return smoke_params, out


def test_shipped_family_is_found_and_loaded_without_training(shipped, monkeypatch):
    params, folder = shipped
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["members"]) == set("abcde") and manifest["weights_dtype"] == "float16"
    for rec in manifest["members"].values():  # fp16 rounding moves the loss by far less than training differences
        assert rec["val_loss"] == pytest.approx(rec["val_loss_fp32_weights"], abs=5e-3)
        assert rec["precision"] in ("fp32", "bf16") and rec["cpu"]["model"]
    # the training cache is gone: only the shipped folder can provide the family, and nothing trains
    import shutil

    shutil.rmtree(params["artifacts_dir"] + "/family")
    monkeypatch.setattr(train, "train_member", lambda *a, **k: pytest.fail("loading a shipped family trained"))
    fam = families.load_family("embedded", params)
    assert fam.info["source"] == "shipped (embedded-smoke)"
    assert fam.identity["b"] == "sha256:" + manifest["files"]["b/model.safetensors"]["sha256"]
    model = fam.load("b")
    assert model.W_in.dtype == torch.float32
    # checkpoints: the same members at every step (those the manifest lists); step 0 is rebuilt
    # from the seed, the last step is the final weights
    step = manifest["checkpoint_steps"][0]
    ck = families.load_family("embedded", params, checkpoint=step)
    assert ck.members == manifest["checkpoint_members"] == list("abc")
    init = families.load_family("embedded", params, checkpoint=0)
    assert init.members == list("abc") and init.identity["a"].startswith("init-sha256:")
    end = families.load_family("embedded", params, checkpoint=fam.info["checkpoint_steps"][-1])
    assert end.members == list("abc") and end.identity["a"] == fam.identity["a"]
    ctl = families.load_family("embedded-untrained", params, members=["a", "b", "c"])
    assert ctl.members == list("abc")
    assert weights.check_shipped(params) == []


def test_a_flipped_byte_is_named_and_never_loaded(shipped):
    params, folder = shipped
    target = folder / "c" / "model.safetensors"
    blob = bytearray(target.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    target.write_bytes(bytes(blob))
    fam = families.load_family("embedded", params)
    with pytest.raises(weights.ShippedWeightsError, match=r"c/model\.safetensors: sha256 differs"):
        fam.load("c")
    problems = weights.check_shipped(params)
    assert len(problems) == 1 and "c/model.safetensors" in problems[0]
    with pytest.raises(SystemExit) as e:
        train.main(["--preset", "smoke", "--check"])  # the command line exits non-zero
    assert e.value.code == 1


def test_truncated_and_missing_files_are_named(shipped):
    params, folder = shipped
    target = folder / "a" / "model.safetensors"
    target.write_bytes(target.read_bytes()[:1000])
    (folder / "d" / "config.json").unlink()
    problems = weights.check_shipped(params)
    assert any("a/model.safetensors" in p and "truncated" in p for p in problems)
    assert any("d/config.json: missing" in p for p in problems)
    (folder / "vocab_gpt2_ids.npy").write_bytes(b"garbage")
    with pytest.raises(weights.ShippedWeightsError, match="vocab_gpt2_ids.npy"):
        families.load_family("embedded", params)


def test_check_names_the_member_whose_loss_differs(shipped):
    params, folder = shipped
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["members"]["e"]["val_loss"] += 0.01
    path.write_text(json.dumps(manifest))
    problems = weights.check_shipped(params)
    assert len(problems) == 1 and problems[0].startswith("member e")


def test_a_changed_preset_does_not_match_the_shipped_family(shipped):
    params, _ = shipped
    other = params.replace(embedded={**params["embedded"], "lr": 0.001})
    with pytest.raises(families.FamilyNotTrained):
        families.load_family("embedded", other)


def test_the_default_preset_keeps_the_key_of_the_shipped_six_layer_family():
    """The shipped family was trained on a GPU and cannot be retrained on a CPU: a change to the
    default preset's architecture, recipe, seeds, members or corpus, to `TRAINER_VERSION` or to how
    the key is computed would orphan it. The key is pinned here, computed without building anything."""
    from helpers.core.cache import config_hash
    from helpers.data.corpus import corpus_config
    from helpers.core.presets import load_preset, repo_root

    params = load_preset("default")
    manifest = json.loads((repo_root() / "weights" / "embedded-deep" / "manifest.json").read_text())
    corpus_key = config_hash(corpus_config(params["corpus"]))
    assert corpus_key == manifest["corpus_key"] == "eb998101dfab"
    assert weights.shipped_key(params, corpus_key) == manifest["key"] == "d3e57dd9b0cb"
    assert manifest["arch"]["n_layers"] == 6 and weights.TRAINER_VERSION == manifest["trainer"] == 2


def test_weights_env_points_at_another_folder_of_families(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path))
    assert weights.shipped_root() == tmp_path.resolve()
    monkeypatch.setenv(weights.WEIGHTS_ENV, str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="UNIVERSAL_NEURONS_WEIGHTS"):
        weights.shipped_root()

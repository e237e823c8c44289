"""The preset object: schema checks with named keys, overrides, immutability, notebook injection."""
import copy
import json
import pickle
from pathlib import Path

import pytest
import yaml

from helpers.core import presets
from helpers.core.presets import PresetError, available_presets, load_preset, notebook_preset

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ["smoke", "default", "gpt2-small", "gpt2-medium"]
EVERY_FILE = sorted(p.stem for p in (ROOT / "params").glob("*.yaml"))


def smoke_data() -> dict:
    return yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())


def write_preset(tmp_path, data: dict, name: str = "mine") -> Path:
    data = {k: v for k, v in data.items() if k != "preset"}  # a file outside params/ is named by its path
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", EVERY_FILE)
def test_every_shipped_preset_loads_with_its_own_name(name):
    params = load_preset(name)
    assert params.preset == params["preset"] == name
    assert params.path == ROOT / "params" / f"{name}.yaml"
    raw = yaml.safe_load((ROOT / "params" / f"{name}.yaml").read_text())
    assert params.to_dict() == raw  # nothing added, nothing dropped
    for seed in ("train_seed", "baseline_seed", "sample_seed"):
        assert isinstance(params[seed], int)


def test_every_file_in_params_loads():
    assert set(SHIPPED) <= set(available_presets())
    for name in available_presets():
        load_preset(name)


def test_misspelt_key_added_at_the_top_level_is_an_error_naming_file_key_and_closest(tmp_path):
    path = write_preset(tmp_path, {**smoke_data(), "n_tokenz": 3000})
    with pytest.raises(PresetError) as e:
        load_preset(path)
    msg = str(e.value)
    assert "mine.yaml" in msg and "`n_tokenz`" in msg and "did you mean `n_tokens`?" in msg


def test_misspelt_key_in_place_of_a_required_key_names_both(tmp_path):
    data = smoke_data()
    data["n_tokenz"] = data.pop("n_tokens")
    with pytest.raises(PresetError) as e:
        load_preset(write_preset(tmp_path, data))
    msg = str(e.value)
    assert "`n_tokenz` (did you mean `n_tokens`?)" in msg
    assert "missing required key `n_tokens`" in msg
    assert not isinstance(e.value, KeyError)


def test_missing_required_key_is_named(tmp_path):
    data = smoke_data()
    del data["baseline_seed"]
    with pytest.raises(PresetError, match="missing required key `baseline_seed`"):
        load_preset(write_preset(tmp_path, data))


@pytest.mark.parametrize("block,bad,closest", [("embedded", "d_modle", "d_model"), ("corpus", "val_fracton", "val_fraction")])
def test_unknown_key_inside_a_block_names_block_key_and_closest(tmp_path, block, bad, closest):
    data = smoke_data()
    data[block][bad] = data[block].pop(closest)
    with pytest.raises(PresetError) as e:
        load_preset(write_preset(tmp_path, data))
    msg = str(e.value)
    assert "mine.yaml" in msg and f"`{block}` block" in msg and f"`{bad}` (did you mean `{closest}`?)" in msg


def test_missing_architecture_key_in_the_embedded_block_is_named(tmp_path):
    data = smoke_data()
    del data["embedded"]["n_ctx"]
    with pytest.raises(PresetError, match="missing required key `n_ctx` in the `embedded` block"):
        load_preset(write_preset(tmp_path, data))


def test_embedded_family_without_embedded_block_is_an_error(tmp_path):
    data = smoke_data()
    del data["embedded"]
    with pytest.raises(PresetError, match="needs an `embedded` block"):
        load_preset(write_preset(tmp_path, data))


def test_the_former_seed_key_says_what_replaced_it(tmp_path):
    data = smoke_data()
    data["seed"] = 0
    with pytest.raises(PresetError, match="`seed` was split into `train_seed`.*`baseline_seed`.*`sample_seed`"):
        load_preset(write_preset(tmp_path, data))


@pytest.mark.parametrize("key,value,expected", [
    ("n_tokens", "3e5", "`n_tokens` must be a positive integer"),   # YAML 1.1 reads 3e5 as a string
    ("threshold", "high", "`threshold` must be a number"),
    ("baseline", "rotated", "`baseline` must be one of 'rotation', 'gaussian'"),
    ("train_seed", True, "`train_seed` must be a non-negative integer"),
    ("sample_seed", -1, "`sample_seed` must be a non-negative integer"),
])
def test_values_of_the_wrong_type_are_named(tmp_path, key, value, expected):
    with pytest.raises(PresetError, match=expected):
        load_preset(write_preset(tmp_path, {**smoke_data(), key: value}))


def test_block_values_are_checked(tmp_path):
    data = smoke_data()
    data["embedded"]["precision"] = "fp16"
    with pytest.raises(PresetError, match="`embedded.precision` must be one of 'auto', 'fp32', 'bf16'"):
        load_preset(write_preset(tmp_path, data))


def test_a_copied_file_that_keeps_another_presets_name_is_refused(tmp_path):
    path = tmp_path / "copy.yaml"
    path.write_text((ROOT / "params" / "smoke.yaml").read_text())  # says `preset: smoke`
    with pytest.raises(PresetError, match="says `preset: smoke`, which is not this file: set `preset: copy`"):
        load_preset(path)


def test_a_file_outside_params_is_named_by_its_stem(tmp_path):
    assert load_preset(write_preset(tmp_path, smoke_data(), "elsewhere")).preset == "elsewhere"


def test_overrides_replace_values_and_none_keeps_them():
    base = load_preset("smoke")
    p = load_preset("smoke", n_tokens=1234, device=None, threshold=0.3, baseline_seed=7)
    assert (p.n_tokens, p["threshold"], p["baseline_seed"]) == (1234, 0.3, 7)
    assert p.device == base.device == "cpu"
    assert p.train_seed == base.train_seed  # the baseline seed does not touch training
    assert load_preset("smoke", n_tokens=None, device=None) == base
    assert base.n_tokens == 20000  # the original is untouched


def test_an_override_replaces_a_block_as_a_whole_and_is_checked():
    base = load_preset("smoke")
    wider = base.replace(embedded={**base["embedded"], "d_model": 64})
    assert wider["embedded"]["d_model"] == 64 and base["embedded"]["d_model"] == 32
    with pytest.raises(PresetError, match="`n_layers`"):
        base.replace(embedded={"d_model": 64})  # the rest of the block is not merged in


def test_unknown_or_ill_typed_overrides_are_errors():
    with pytest.raises(PresetError, match="unknown override `n_tokenz` \\(did you mean `n_tokens`\\?\\)"):
        load_preset("smoke", n_tokenz=5)
    with pytest.raises(PresetError, match="`batch_size` must be a positive integer, got 0"):
        load_preset("smoke", batch_size=0)
    with pytest.raises(PresetError, match="choose another file"):
        load_preset("smoke", preset="default")


def test_preset_is_immutable_at_every_level():
    p = load_preset("smoke")
    with pytest.raises(AttributeError):
        p.n_tokens = 5
    with pytest.raises(TypeError):
        p["n_tokens"] = 5
    with pytest.raises(TypeError, match="read-only"):
        p["embedded"]["d_model"] = 5
    with pytest.raises(TypeError, match="read-only"):
        p["embedded"].update(d_model=5)
    with pytest.raises(TypeError, match="read-only"):
        p["corpus"]["sources"].append("mine")
    assert p["embedded"]["d_model"] == 32 and "mine" not in p["corpus"]["sources"]
    # a deep copy or a pickled copy (worker processes) is an equal, still read-only, preset
    q = copy.deepcopy(p)
    assert q == p == pickle.loads(pickle.dumps(p))
    with pytest.raises(TypeError):
        q["embedded"]["d_model"] = 5


def test_mapping_interface_and_plain_copies():
    smoke, hub = load_preset("smoke"), load_preset("gpt2-small")
    assert smoke["embedded"]["d_model"] == smoke.embedded["d_model"] == 32
    assert "embedded" in smoke and "embedded" not in hub and "corpus" not in hub
    assert hub.get("corpus", {}) == {} and hub.get("n_seeds", 5) == 5
    assert smoke["corpus"]["sources"] == smoke_data()["corpus"]["sources"]  # equal to a plain list
    plain = smoke.to_dict()
    assert type(plain["embedded"]) is dict and type(plain["corpus"]["sources"]) is list
    plain["embedded"]["d_model"] = 1  # a copy: the preset keeps its value
    assert smoke["embedded"]["d_model"] == 32
    assert json.loads(json.dumps(dict(smoke))) == json.loads(json.dumps(smoke.to_dict())) == smoke_data()


def test_looking_up_a_name_that_is_no_preset_key_is_an_error_not_a_default():
    p = load_preset("smoke")
    with pytest.raises(KeyError, match="`seed` was split"):
        p.get("seed", 0)
    with pytest.raises(KeyError, match="did you mean `n_tokens`"):
        p["n_tokenz"]
    with pytest.raises(KeyError, match="does not set `n_seeds`"):
        p["n_seeds"]
    assert "seed" not in p


def test_the_embedded_block_is_parsed_once_into_typed_architecture_and_recipe():
    from dataclasses import fields

    from helpers.models import loading

    assert set(presets.EMBEDDED_KEYS) == set(presets.ARCH_KEYS) | set(presets.RECIPE_DEFAULTS)
    assert {k for k, key in presets.EMBEDDED_KEYS.items() if key.required} == set(presets.ARCH_KEYS)
    assert loading.ARCH_KEYS == presets.ARCH_KEYS == tuple(f.name for f in fields(presets.Architecture))
    for k, v in presets.RECIPE_DEFAULTS.items():  # every recipe default passes its own check unchanged
        assert presets.EMBEDDED_KEYS[k].check(v) == v, k
    p = load_preset("smoke")
    raw = smoke_data()["embedded"]
    assert p.arch == presets.Architecture(**{k: raw[k] for k in presets.ARCH_KEYS}) and p.arch["n_ctx"] == p.arch.n_ctx == 64
    assert p.recipe.lr == raw["lr"] and p.recipe.n_checkpoints == raw["n_checkpoints"]
    assert p.recipe.min_lr_frac == presets.Recipe().min_lr_frac  # left out of the block: the default
    assert p.recipe.to_dict() == {**presets.RECIPE_DEFAULTS, **{k: v for k, v in raw.items() if k not in presets.ARCH_KEYS}}
    wider = p.replace(embedded={**p["embedded"], "d_model": 64})
    assert wider.arch.d_model == 64 and p.arch.d_model == 32  # a replaced block is parsed again
    assert load_preset("gpt2-small").arch is None and load_preset("gpt2-small").recipe is None
    with pytest.raises(AttributeError):
        p.arch.n_ctx = 5


def test_the_former_autocast_key_in_the_embedded_block_says_what_replaced_it(tmp_path):
    data = smoke_data()
    data["embedded"]["autocast_bf16"] = True
    with pytest.raises(PresetError, match="replaced by `precision: auto | fp32 | bf16`"):
        load_preset(write_preset(tmp_path, data))


def test_the_artifacts_path_is_resolved_against_the_repository_root(tmp_path):
    p = load_preset("smoke")
    assert p.artifacts_path == ROOT / p.artifacts_dir and p.artifacts_path.is_dir()
    assert p.replace(artifacts_dir=str(tmp_path / "elsewhere")).artifacts_path == tmp_path / "elsewhere"


@pytest.mark.parametrize("name", EVERY_FILE)
def test_preset_files_keep_their_lines_short(name):
    long = [l for l in (ROOT / "params" / f"{name}.yaml").read_text().splitlines() if len(l) > 96]
    assert not long, f"params/{name}.yaml: lines over 96 characters: {long}"


@pytest.mark.parametrize("name", EVERY_FILE)
def test_every_size_fits_in_what_it_is_a_part_of(name):
    p = load_preset(name)
    for key, bound in presets.SUBSAMPLES.items():
        assert key in presets.TOP_KEYS and bound in presets.TOP_KEYS
        assert 0 < p[key] <= p[bound], (key, bound)


@pytest.mark.parametrize("key,bound", list(presets.SUBSAMPLES.items()))
def test_a_size_larger_than_what_it_is_a_part_of_is_an_error_naming_both(tmp_path, key, bound):
    data = smoke_data()
    data[key] = data[bound] + 1
    with pytest.raises(PresetError) as e:
        load_preset(write_preset(tmp_path, data))
    msg = str(e.value)
    assert "mine.yaml" in msg
    assert f"`{key}` ({data[bound] + 1}) is larger than `{bound}` ({data[bound]})" in msg
    assert f"set `{key}` to at most {data[bound]}, or raise `{bound}`" in msg


def test_an_override_that_lowers_a_bound_lowers_the_sizes_it_leaves_unchanged():
    base = load_preset("default")
    small = load_preset("default", n_tokens=5000, bos_rows=8)
    assert small.explain_tokens == small.conditioning_tokens == small.attention_tokens == 5000
    assert small.control_loss_tokens == small.check_tokens == 5000
    assert small.second_bos_rows == 8
    assert small.explain_single_tokens == base.explain_single_tokens  # its bound is n_tokens_single
    assert small.context_tokens == base.context_tokens  # its bound is n_tokens_aux
    # raising a bound raises nothing; a size set with it is kept as set
    assert load_preset("default", n_tokens=10**6).explain_tokens == base.explain_tokens
    assert load_preset("default", n_tokens=5000, explain_tokens=3000).explain_tokens == 3000
    # papermill -f injects every key of the file: the file's own values count as unchanged
    raw = {k: v for k, v in yaml.safe_load((ROOT / "params" / "default.yaml").read_text()).items() if k != "preset"}
    assert load_preset("default", **{**raw, "n_tokens": 5000}) == small.replace(bos_rows=base.bos_rows,
                                                                                 second_bos_rows=base.second_bos_rows)


def test_an_override_that_sets_a_size_too_large_is_an_error():
    with pytest.raises(PresetError, match="`explain_tokens` \\(30000\\) is larger than `n_tokens` \\(20000\\)"):
        load_preset("smoke", explain_tokens=30000)
    with pytest.raises(PresetError, match="`explain_tokens` \\(6000\\) is larger than `n_tokens` \\(5000\\)"):
        load_preset("smoke", n_tokens=5000, explain_tokens=6000)


def test_the_random_grid_is_a_non_empty_list_of_numbers(tmp_path):
    assert load_preset("default").entropy_random_grid == [0.0, 3.0, 6.0]
    for bad in ([], "0 3 6", [0.0, "x"]):
        with pytest.raises(PresetError, match="`entropy_random_grid` must be a non-empty list of numbers"):
            load_preset(write_preset(tmp_path, {**smoke_data(), "entropy_random_grid": bad}))


def test_nullable_sizing_keys_are_present_as_null():
    p = load_preset("gpt2-small")
    assert p["vocab_single_neurons"] is None and "vocab_single_neurons" in p
    assert p["properties_single_vocab_neurons"] is None and "properties_single_vocab_neurons" in p
    assert load_preset("smoke").vocab_single_neurons == 256


def test_the_schema_is_the_dataclass():
    from dataclasses import fields

    assert presets.KEYS == tuple(f.name for f in fields(presets.Preset) if f.init and f.name != "path")


def test_the_training_seed_alone_moves_the_family_key():
    from helpers.models import weights

    base = load_preset("smoke")
    key = weights.shipped_key(base, "corpus")
    assert weights.shipped_key(base.replace(train_seed=11), "corpus") != key
    assert weights.shipped_key(base.replace(baseline_seed=11, sample_seed=11), "corpus") == key


# ---- notebooks: the namespace papermill leaves before the cell that builds `params` ----

NOTEBOOK_PARAMETERS = {"preset": "default", "device": None, "n_tokens": None, "threshold": None}


@pytest.mark.parametrize("name", SHIPPED)
def test_papermill_p_preset_selects_the_file(name):
    ns = {**NOTEBOOK_PARAMETERS, "preset": name, "presets": presets}  # a module in the namespace is ignored
    assert notebook_preset(ns) == load_preset(name)


@pytest.mark.parametrize("name", SHIPPED)
def test_papermill_f_file_injects_every_key_and_loads_that_file(name):
    injected = yaml.safe_load((ROOT / "params" / f"{name}.yaml").read_text())
    ns = {**NOTEBOOK_PARAMETERS, **injected}  # the notebook declares only some of the injected keys
    assert notebook_preset(ns) == load_preset(name)


def test_an_injected_value_reaches_the_preset_declared_or_not():
    ns = {**NOTEBOOK_PARAMETERS, "preset": "smoke", "n_tokens": 4096, "baseline_seed": 3}  # baseline_seed undeclared
    p = notebook_preset(ns)
    assert (p.n_tokens, p.baseline_seed, p.threshold) == (4096, 3, 0.5)


def test_an_injected_misspelt_value_is_checked():
    with pytest.raises(PresetError, match="`threshold` must be a number"):
        notebook_preset({**NOTEBOOK_PARAMETERS, "preset": "smoke", "threshold": "0.3x"})


def test_a_notebook_without_preset_is_told_to_set_it():
    with pytest.raises(PresetError, match="must set `preset`"):
        notebook_preset({"n_tokens": 5})


# ---- command lines: one helper resolves every job's flags against its preset ----

def test_command_line_flags_override_the_preset_and_default_to_it(tmp_path):
    from helpers.core.cli import preset_from_args, preset_parser

    ap = preset_parser("job", ["n_tokens", "threshold", "baseline", "device"])
    args = ap.parse_args(["--preset", "smoke", "--n-tokens", "4096", "--threshold", "0.3"])
    p = preset_from_args(args)
    assert (p.n_tokens, p.threshold, p.baseline, p.device) == (4096, 0.3, "rotation", "cpu")
    assert preset_from_args(ap.parse_args(["--preset", "smoke"])) == load_preset("smoke")
    path = write_preset(tmp_path, {**smoke_data(), "batch_size": 3}, "mine")
    assert preset_from_args(ap.parse_args(["--preset", str(path)])).batch_size == 3
    with pytest.raises(SystemExit):  # argparse refuses a value outside the preset's choices
        ap.parse_args(["--baseline", "rotated"])
    with pytest.raises(PresetError, match="`n_tokens` must be a positive integer, got 0"):
        preset_from_args(ap.parse_args(["--preset", "smoke", "--n-tokens", "0"]))
    with pytest.raises(ValueError, match="not preset keys"):
        preset_parser("job", ["n_tokenz"])

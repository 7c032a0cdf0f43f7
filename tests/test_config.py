"""Config loading: every bad input fails at once with one message naming the file, the key and the fix."""

from pathlib import Path

import pytest
import yaml

from posae.checks import load_config
from posae.config import Config, ConfigError, read_yaml, to_dict
from posae.paths import PARAMS_DIR


def write(tmp_path: Path, data: dict, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
def test_committed_configs_validate_offline(name):
    cfg = load_config(name)
    assert isinstance(cfg, Config) and cfg.name == name


def test_default_is_the_offline_gemma_at_the_papers_relative_depths():
    cfg = load_config("default", check_model=False)
    assert cfg.model.name == "gemma3-270m" and cfg.corpus.name == "sotu"
    assert cfg.capture.layers == (3, 8, 13)
    assert (cfg.corpus.seq_len, cfg.corpus.n_train, cfg.corpus.n_val) == (128, 1000, 1000)


def test_paper_config_holds_the_papers_setting():
    cfg = load_config("paper", check_model=False)
    assert cfg.model.name == "google/gemma-2-2b" and cfg.capture.layers == (5, 12, 19)
    assert cfg.corpus.name == "monology/pile-uncopyrighted"
    assert (cfg.corpus.n_train, cfg.corpus.n_val) == (1000, 10000)


BAD = [
    ({"capture": {"layerz": [1]}}, "capture.layerz", "unknown key"),
    ({"modle": {}}, "modle", "unknown key"),
    ({"corpus": {"seq_len": "long"}}, "corpus.seq_len", "expected an integer"),
    ({"corpus": {"seq_len": 1}}, "corpus.seq_len", "below the minimum"),
    ({"corpus": {"n_train": 2.5}}, "corpus.n_train", "expected an integer"),
    ({"model": {"dtype": "float8"}}, "model.dtype", "not one of"),
    ({"model": {"trust_remote_code": "yes"}}, "model.trust_remote_code", "true or false"),
    ({"capture": {"layers": 3}}, "capture.layers", "expected a list"),
    ({"capture": {"layers": []}}, "capture.layers", "empty"),
    ({"probe": {"test_fraction": 1.5}}, "probe.test_fraction", "above the maximum"),
    ({"probe": {"test_fraction": 1.0}}, "probe.test_fraction", "at the excluded bound"),
    ({"train": {"lr": float("nan")}}, "train.lr", "not a finite number"),
    ({"train": {"betas": [0.9, float("inf")]}}, "train.betas[1]", "not a finite number"),
    ({"train": {"seeds": [0, -1]}}, "train.seeds[1]", "below the minimum"),
    ({"train": {"seeds": [0, 0]}}, "train.seeds", "repeats a seed"),
    ({"sae": {"expansion": 0}}, "sae.expansion", "at the excluded bound"),
    ({"name": "../escaped"}, "name", "not a plain name"),
    ({"name": "/abs/path"}, "name", "not a plain name"),
]


@pytest.mark.parametrize("data,key,problem", BAD, ids=[b[1] for b in BAD])
def test_bad_value_names_file_key_and_fix(tmp_path, data, key, problem):
    path = write(tmp_path, data)
    with pytest.raises(ConfigError) as err:
        load_config(path, check_model=False)
    msg = str(err.value)
    assert str(path) in msg and key in msg and problem in msg
    assert "Fix" in msg


def test_layer_beyond_the_model_is_refused(tmp_path):
    smoke = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    smoke["capture"]["layers"] = [1, 4]  # the smoke model has 4 blocks: 0..3
    path = write(tmp_path, smoke)
    with pytest.raises(ConfigError, match=r"capture.layers has 4, .* has 4 layers .*Fix: use layers below 4"):
        load_config(path)


def test_unknown_model_is_refused(tmp_path):
    path = write(tmp_path, {"model": {"name": "no-such-org/no-such-model"}})
    with pytest.raises(ConfigError, match=r"model.name.*Fix"):
        load_config(path)


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(ConfigError, match="default"):
        load_config("nonexistent")


def test_invalid_yaml_is_reported_with_its_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml.*not valid YAML"):
        load_config(path, check_model=False)


def test_a_key_given_twice_is_refused_at_any_level(tmp_path):
    path = tmp_path / "twice.yaml"
    for text, key, lines in [("train: {steps: 5}\nprobe: {}\ntrain: {lr: 0.1}\n", "train", "on lines 1 and 3"),
                             ("train:\n  steps: 5\n  steps: 6\n", "train.steps", "on lines 2 and 3"),
                             ("capture: {layers: [1], layers: [2]}\n", "capture.layers", "on line 1"),
                             ("a:\n  - {x: 1, x: 2}\n", "a[0].x", "on line 2")]:
        path.write_text(text)
        with pytest.raises(ConfigError) as err:
            load_config(path, check_model=False)
        assert str(err.value).startswith(f"{path}: {key}: key given twice {lines}; ") and "Fix: " in str(err.value)


def test_yaml_anchors_and_merge_keys_still_work(tmp_path):
    path = tmp_path / "merged.yaml"
    path.write_text("x-base: &base {steps: 5, lr: 0.1}\n")
    assert read_yaml(path) == {"x-base": {"steps": 5, "lr": 0.1}}
    path.write_text("probe: &p {seed: 3}\ntrain:\n  <<: {steps: 5, lr: 0.1}\n  lr: 0.2\n")  # an explicit key wins
    assert read_yaml(path) == {"probe": {"seed": 3}, "train": {"steps": 5, "lr": 0.2}}


def test_config_is_frozen_and_round_trips_to_dict():
    cfg = load_config("smoke", check_model=False)
    with pytest.raises(Exception):
        cfg.corpus.seq_len = 3
    again = load_config("smoke", check_model=False)
    assert to_dict(cfg) == to_dict(again)
    assert cfg.section_hash("model", "corpus") == again.section_hash("model", "corpus")

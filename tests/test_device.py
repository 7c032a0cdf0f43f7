"""`--device` / POSAE_DEVICE: it overrides model.device in every loaded config, reaches capture,
training and evaluation, and a device that is not there fails at once, naming it and the fix."""

import dataclasses
import json
import os

import pytest
import torch
import yaml

from posae.__main__ import main
from posae.checks import load_config
from posae.config import DEVICE_ENV, ConfigError, device_env
from posae.data import models
from posae.paths import PARAMS_DIR

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.fixture(autouse=True)
def no_override(monkeypatch):
    monkeypatch.delenv(DEVICE_ENV, raising=False)


def test_env_overrides_model_device(monkeypatch):
    assert load_config("default", check_model=False).model.device == "auto"
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    assert load_config("default", check_model=False).model.device == "cpu"
    monkeypatch.setenv(DEVICE_ENV, "gpu")
    with pytest.raises(ConfigError, match=r"POSAE_DEVICE='gpu'.*not one of auto, cpu, cuda, mps.*Fix"):
        load_config("default", check_model=False)


def test_device_env_sets_and_restores():
    with device_env("cpu"):
        assert os.environ[DEVICE_ENV] == "cpu"
    assert DEVICE_ENV not in os.environ
    with device_env(None):
        assert DEVICE_ENV not in os.environ


@no_cuda
def test_override_reaches_capture_and_training(tmp_path, monkeypatch, runs_root):
    """A config asking for cuda fails here; with --device cpu over it, capture and training run on the CPU."""
    from posae.data.capture import capture
    from posae.train import train_variant

    data = yaml.safe_load((PARAMS_DIR / "smoke.yaml").read_text())
    data["model"]["device"] = "cuda"
    data["name"] = "smoke-device"
    path = tmp_path / "smoke-device.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"model.device is cuda.*Fix"):
        load_config(path)
    monkeypatch.setenv(DEVICE_ENV, "cpu")
    cfg = load_config(path)
    assert cfg.model.device == "cpu"
    stores = capture(cfg, progress=False)
    meta = json.loads((stores[1, "train"] / "meta.json").read_text())
    assert meta["device"] == "cpu" and "device" not in meta.get("settings", {}).get("model", {})
    [run] = train_variant(cfg, "baseline", layers=[1], seeds=[0], progress=False)
    info = json.loads((run / "config.json").read_text())
    assert info["device"] == "cpu" and info["config"]["model"]["device"] == "cpu"
    # The store does not depend on the device asked for: without the override (auto, here the
    # CPU) the same stores serve, so training does not call them stale.
    monkeypatch.setenv(DEVICE_ENV, "auto")
    assert train_variant(load_config(path), "baseline", layers=[1], seeds=[0], progress=False) == [run]


@no_cuda
def test_missing_cuda_fails_before_any_work(monkeypatch, capsys):
    def heavy(*args, **kwargs):
        raise AssertionError("heavy work started before the device check")

    monkeypatch.setattr(models, "load_tokenizer", heavy)
    monkeypatch.setattr(models, "load_model", heavy)
    assert main(["capture", "--config", "smoke", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "POSAE_DEVICE=cuda (--device cuda)" in err and "Fix" in err and "--device cpu" in err
    assert DEVICE_ENV not in os.environ  # the override lasts for the command only


@no_cuda
@pytest.mark.parametrize("step", ["train", "evaluate", "probe"])
def test_training_and_evaluation_check_the_device_first(monkeypatch, step):
    from posae.eval.metrics import evaluate_all
    from posae.eval.probes import probe_all
    from posae.train import train_variant

    monkeypatch.setenv(DEVICE_ENV, "cuda")
    cfg = load_config("smoke", check_model=False)  # as notebook code may; nothing captured under this name
    cfg = dataclasses.replace(cfg, name="never-captured")
    run = {"train": lambda: train_variant(cfg, "baseline", progress=False),
           "evaluate": lambda: evaluate_all(cfg, progress=False),
           "probe": lambda: probe_all(cfg, progress=False)}[step]
    with pytest.raises(ConfigError, match=r"POSAE_DEVICE=cuda.*Fix"):
        run()

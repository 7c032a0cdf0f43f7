"""The Dask executor: the smoke reproduction on a 2-worker LocalCluster leaves the local executor's
products byte for byte, and its failures read like the local ones. Needs the dask extra
(`make test-extras`).

What is compared, and what is not (it differs between any two runs, whatever the executor):
- activation stores: every file, bytes (meta.json included: it holds no path or time);
- SAE runs: weights.safetensors bytes; metrics.jsonl without the `perf/*` throughput keys;
  config.json without train_seconds, tokens_per_s and store.path (timings, and the run's own folder);
- the tables under runs/<config>/ and figures/<config>/ (every .csv and .md), bytes;
- not compared: run_info.json (wall times), the executed and rendered notebooks (execution
  timestamps), stage records (seconds, times), environment/ (machine facts), the PNGs (pixels of
  the same data, but a PNG carries nothing a table does not).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from posae.paths import figures_dir, run_dir
from posae.pipeline.driver import ExecutorError, reproduce
from posae.pipeline.stages import StageFailed

pytestmark = pytest.mark.extras

VOLATILE_INFO = ("train_seconds", "tokens_per_s")


@pytest.fixture(scope="module")
def dask_products(smoke_reproduction):
    """The smoke reproduction again, on a 2-worker LocalCluster, into other runs/ and figures/ folders:
    returns {"local": (runs, figures), "dask": (runs, figures)} for config smoke."""
    local = (run_dir("smoke"), figures_dir("smoke"))
    env = {"POSAE_RUNS": tempfile.mkdtemp(prefix="posae-test-dask-runs-"),
           "POSAE_FIGURES": tempfile.mkdtemp(prefix="posae-test-dask-figures-")}
    old = {k: os.environ[k] for k in env}
    os.environ.update(env)
    try:
        rows = reproduce("smoke", executor="dask", workers=2, log=lambda line: None)
        assert {r["status"] for r in rows} == {"ran"}
        dask = (run_dir("smoke"), figures_dir("smoke"))
    finally:
        os.environ.update(old)
    return {"local": local, "dask": dask}


def _files(root: Path, pattern: str) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.glob(pattern)) if p.is_file()}


def _same_files(a: dict[str, Path], b: dict[str, Path]) -> list[str]:
    assert a and sorted(a) == sorted(b), f"different files: {sorted(set(a) ^ set(b))}"
    return [name for name in a if a[name].read_bytes() != b[name].read_bytes()]


def test_activation_stores_are_identical(dask_products):
    (local, _), (dask, _) = dask_products["local"], dask_products["dask"]
    assert _same_files(_files(local, "activations/**/*"), _files(dask, "activations/**/*")) == []


def test_sae_weights_are_identical(dask_products):
    (local, _), (dask, _) = dask_products["local"], dask_products["dask"]
    a, b = _files(local, "saes/*/*/*/weights.safetensors"), _files(dask, "saes/*/*/*/weights.safetensors")
    assert len(a) == 44  # 11 variants x 2 layers x 2 seeds
    assert _same_files(a, b) == []


def test_training_logs_and_run_configs_agree(dask_products):
    (local, _), (dask, _) = dask_products["local"], dask_products["dask"]
    for name, path in _files(local, "saes/*/*/*/metrics.jsonl").items():
        lines = [[{k: v for k, v in json.loads(line).items() if not k.startswith("perf/")}
                  for line in p.read_text().splitlines()] for p in (path, dask / name)]
        assert lines[0] == lines[1], name
    for name, path in _files(local, "saes/*/*/*/config.json").items():
        infos = [json.loads(p.read_text()) for p in (path, dask / name)]
        for info, root in zip(infos, (local, dask)):
            assert info.pop("store")["path"].startswith(str(root))  # the run's own folder: differs by design
            for key in VOLATILE_INFO:
                info.pop(key)
            info["files"].pop("metrics.jsonl")  # its perf/ timings differ between any two runs
        assert infos[0] == infos[1], name


def test_tables_and_figures_are_identical(dask_products):
    (local, local_fig), (dask, dask_fig) = dask_products["local"], dask_products["dask"]
    tables = _files(local, "*.csv")
    assert {"val_metrics.csv", "probes.csv", "mse_by_position.csv", "feature_stats.csv"} <= set(tables)
    assert _same_files(tables, _files(dask, "*.csv")) == []
    figures = {**_files(local_fig, "*.csv"), **_files(local_fig, "*.md")}
    assert {"table1.csv", "claims.csv"} <= set(figures)
    assert _same_files(figures, {**_files(dask_fig, "*.csv"), **_files(dask_fig, "*.md")}) == []


def test_every_stage_is_recorded_and_rendered(dask_products):
    (local, local_fig), (dask, dask_fig) = dask_products["local"], dask_products["dask"]
    assert sorted(_files(dask, "stages/*.json")) == sorted(_files(local, "stages/*.json"))
    assert sorted(_files(dask_fig, "notebooks/*.html")) == sorted(_files(local_fig, "notebooks/*.html"))


@pytest.fixture
def running_cluster():
    """A one-worker cluster started outside the driver, as on a real cluster: its scheduler's address."""
    from distributed import LocalCluster

    # Starting a worker sets OMP_NUM_THREADS & co. in this process (distributed's nanny): undo it.
    keys = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_")
    old = {k: os.environ.get(k) for k in keys}
    cluster = LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0")
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    try:
        yield cluster.scheduler_address
    finally:
        cluster.close()


def test_a_failing_task_stops_with_the_local_message(tmp_path, monkeypatch, running_cluster):
    """Nothing captured under this POSAE_RUNS: every training run fails; the message is the local one.
    The worker started before POSAE_RUNS was set: the task gets it from the driver, not from its process."""
    monkeypatch.setenv("POSAE_RUNS", str(tmp_path / "local"))
    with pytest.raises(StageFailed) as local:
        reproduce("smoke", only=("train:baseline",), log=lambda line: None)
    monkeypatch.setenv("POSAE_RUNS", str(tmp_path / "dask"))
    with pytest.raises(StageFailed) as dask:
        reproduce("smoke", only=("train:baseline",), executor="dask", scheduler=running_cluster,
                  log=lambda line: None)
    first = [str(e.value).splitlines()[0].replace(str(tmp_path / name), "RUNS")
             for e, name in ((local, "local"), (dask, "dask"))]
    assert first[0].startswith("stage train:baseline failed in 03_train.ipynb: ")
    assert first[0] == first[1]
    assert "-y 'layers: [1]' -y 'seeds: [0]'" in str(dask.value)


def test_an_unreachable_scheduler_is_named_with_the_fix(monkeypatch):
    monkeypatch.setattr("posae.pipeline.driver.CONNECT_TIMEOUT", "1s")
    with pytest.raises(ExecutorError, match=r"tcp://127\.0\.0\.1:9(.|\n)*Fix: start the scheduler"):
        reproduce("smoke", executor="dask", scheduler="tcp://127.0.0.1:9", log=lambda line: None)


def test_missing_dask_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(ExecutorError, match=r"pip install -e '\.\[dask\]'"):
        reproduce("smoke", executor="dask", log=lambda line: None)


def test_scheduler_options_need_the_dask_executor():
    with pytest.raises(ExecutorError, match="--executor dask"):
        reproduce("smoke", scheduler="tcp://127.0.0.1:9", log=lambda line: None)

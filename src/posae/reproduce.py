"""The driver: run every notebook in order with papermill, render each to HTML, rebuild figures/.

A stage is one executed notebook (03_train once per variant). Each finished stage leaves a record,
``runs/<config>/stages/<stage>.json``, holding its fingerprint: a content hash of the notebook, its
parameters, the config files it reads and the fingerprints of the stages it depends on. A stage
whose record matches is skipped, so a second run does nothing, an interrupted run resumes at the
first unfinished stage, and changing one variant's YAML reruns that variant's training and what
reads it (probes, ablations, figures) only. Inside a stage the notebooks skip finished work too
(a complete activation store, a finished SAE run), so a stage killed midway resumes cheaply.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from posae.config import Config, load_config
from posae.paths import NOTEBOOKS_DIR, PARAMS_DIR, run_dir, write_json_atomic, write_text_atomic


class UnknownStage(ValueError):
    """A --force/--only name that is not a stage of the plan."""


class StageFailed(RuntimeError):
    """A notebook raised; the message carries its error and the path of the saved failed notebook."""


@dataclass(frozen=True)
class Stage:
    name: str  # e.g. "capture", "train:contrastive"
    notebook: str  # file name under notebooks/
    parameters: dict[str, Any]
    depends: tuple[str, ...] = ()
    inputs: tuple[Path, ...] = field(default=())  # config files it reads, beyond the run config

    @property
    def output_stem(self) -> str:
        suffix = self.name.split(":", 1)[1] if ":" in self.name else ""
        return Path(self.notebook).stem + (f"-{suffix}" if suffix else "")


def variant_names() -> list[str]:
    from posae.saes import REGISTRY

    return sorted(REGISTRY)


def plan(cfg: Config, variants: list[str] | None = None) -> list[Stage]:
    """The stages of a full reproduction of `cfg`, in order."""
    variants = variant_names() if variants is None else variants
    p = {"config": cfg.name}
    trains = [Stage(f"train:{v}", "03_train.ipynb", {**p, "variant": v}, ("capture",),
                    (PARAMS_DIR / "variants" / f"{v}.yaml",)) for v in variants]
    train_names = tuple(s.name for s in trains)
    variant_files = tuple(f for s in trains for f in s.inputs)
    return [
        Stage("capture", "01_capture_activations.ipynb", p),
        Stage("structure", "02_position_structure.ipynb", p, ("capture",)),
        *trains,
        Stage("probe", "04_probe.ipynb", p, ("capture", *train_names), variant_files),
        Stage("ablations", "05_ablations.ipynb", p, ("capture", *train_names), variant_files),
        Stage("figures", "06_figures.ipynb", p, ("structure", "probe", "ablations", *train_names), variant_files),
    ]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def fingerprint(stage: Stage, cfg: Config, upstream: dict[str, str]) -> str:
    blob = {
        "notebook": _file_digest(NOTEBOOKS_DIR / stage.notebook),
        "parameters": stage.parameters,
        "config": _file_digest(Path(cfg.source)),
        "inputs": {str(p.name): _file_digest(p) for p in stage.inputs},
        "upstream": {d: upstream[d] for d in stage.depends},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def _record_path(cfg: Config, stage: Stage) -> Path:
    return run_dir(cfg.name) / "stages" / f"{stage.name.replace(':', '-')}.json"


def is_done(cfg: Config, stage: Stage, fp: str) -> bool:
    path = _record_path(cfg, stage)
    if not path.exists():
        return False
    return json.loads(path.read_text()).get("fingerprint") == fp


def render_html(notebook: Path, html: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    write_text_atomic(html, body)


def execute(cfg: Config, stage: Stage) -> Path:
    """Run one notebook through papermill; returns the executed notebook's path."""
    import papermill as pm

    out_dir = run_dir(cfg.name) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{stage.output_stem}.ipynb"
    try:
        pm.execute_notebook(str(NOTEBOOKS_DIR / stage.notebook), str(out), parameters=stage.parameters,
                            cwd=str(NOTEBOOKS_DIR), kernel_name="python3", progress_bar=False)
    except pm.PapermillExecutionError as e:
        raise StageFailed(f"stage {stage.name} failed in {stage.notebook}: {e.ename}: {e.evalue}\n"
                          f"The failed notebook is saved at {out}") from None
    render_html(out, out.with_suffix(".html"))
    return out


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


def default_jobs() -> int:
    """How many training notebooks run side by side: 2 where there are 2+ cores, each single-threaded.

    An SAE step at batch 1024 gains little from a second thread (46k vs 41k tokens/s measured here),
    so two single-threaded trainings nearly double throughput.
    """
    return max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def _threads_per_kernel(n: int):
    """Kernels started inside inherit this: `posae.notebook.setup` reads POSAE_THREADS."""
    keys = ("POSAE_THREADS", "OMP_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: str(n) for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def reproduce(config: str = "default", force: tuple[str, ...] = (), only: tuple[str, ...] = (),
              variants: list[str] | None = None, log: Callable[[str], None] = print,
              jobs: int | None = None) -> list[dict]:
    """Run the pipeline for `config`; returns one row per stage (name, status, seconds).

    `force` reruns the named stages (and, through the fingerprints, nothing else is invalidated);
    `only` restricts the run to the named stages ("train" selects every training stage). The
    training stages, independent of each other, run `jobs` at a time (default: `default_jobs()`),
    each kernel with cpu_count // jobs threads.
    """
    jobs = default_jobs() if jobs is None else max(1, jobs)
    cfg = load_config(config)  # validates everything before any stage runs
    stages = plan(cfg, variants)
    known = {s.name for s in stages} | {"train"}
    for name in (*force, *only):
        if name not in known:
            raise UnknownStage(f"unknown stage {name!r}. Fix: use one of {', '.join(sorted(known))}")
    selected = [s for s in stages if not only or s.name in only or ("train" in only and s.name.startswith("train:"))]
    fps: dict[str, str] = {}
    for stage in stages:
        fps[stage.name] = fingerprint(stage, cfg, fps)
    rows: list[dict] = []
    start = time.perf_counter()
    total = len(selected)

    def run_one(i: int, stage: Stage) -> dict:
        fp = fps[stage.name]
        forced = stage.name in force or ("train" in force and stage.name.startswith("train:"))
        head = f"[{i}/{total}] {stage.name}"
        if not forced and is_done(cfg, stage, fp):
            log(f"{head}: up to date, skipped")
            return {"stage": stage.name, "status": "skipped", "seconds": 0.0}
        log(f"{head}: running {stage.notebook} ({total - i} after it; elapsed {_fmt(time.perf_counter() - start)})")
        t0 = time.perf_counter()
        out = execute(cfg, stage)
        seconds = time.perf_counter() - t0
        write_json_atomic(_record_path(cfg, stage), {"stage": stage.name, "fingerprint": fp, "seconds": seconds,
                                                      "notebook": str(out), "finished": time.time()})
        log(f"{head}: done in {_fmt(seconds)}")
        return {"stage": stage.name, "status": "ran", "seconds": seconds}

    numbered = list(enumerate(selected, 1))
    trains = [(i, s) for i, s in numbered if s.name.startswith("train:")]
    for i, stage in numbered:
        if not stage.name.startswith("train:"):
            rows.append(run_one(i, stage))
        elif (i, stage) == trains[0]:
            rows.extend(_run_parallel(run_one, trains, jobs))
    publish_renders(cfg)
    log(f"all {total} stages finished in {_fmt(time.perf_counter() - start)}")
    return rows


def publish_renders(cfg: Config) -> Path:
    """Copy the HTML renders beside the figures, so a reader sees every notebook without running one."""
    from posae.figures import figures_dir

    out = figures_dir(cfg.name) / "notebooks"
    for html in sorted((run_dir(cfg.name) / "notebooks").glob("*.html")):
        write_text_atomic(out / html.name, html.read_text())
    return out


def _run_parallel(run_one: Callable[[int, Stage], dict], stages: list[tuple[int, Stage]], jobs: int) -> list[dict]:
    """Run independent stages `jobs` at a time; the first failure stops the rest from starting."""
    if jobs == 1 or len(stages) == 1:
        return [run_one(i, s) for i, s in stages]
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    with _threads_per_kernel(max(1, (os.cpu_count() or 1) // jobs)), ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(run_one, i, s) for i, s in stages]
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        for f in futures:
            if f.done() and not f.cancelled() and f.exception() is not None:
                raise f.exception()
        return [f.result() for f in futures]

"""The driver: run every notebook in order with papermill, render each to HTML, rebuild figures/.

Which stages there are, and when one is done, is `posae.pipeline.stages`. The training stages run
side by side, on this machine (`executor="local"`, a thread pool of notebooks) or on a Dask cluster
(`executor="dask"`, one task per variant × layer × seed); every training run has one thread either
way, so both leave the same products byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from posae.checks import load_config
from posae.config import Config, read_config
from posae.paths import (NOTEBOOKS_DIR, check_writable, figures_dir, lock_path, locked, run_dir, write_json_atomic,
                         write_text_atomic)
from posae.pipeline.stages import (Stage, StageFailed, UnknownStage, UpstreamNotReady, config_parameter, describe,
                                   fingerprint, product_problems, products, products_digest, read_record, record_path,
                                   stage_list, train_runs)


# The stages whose matmuls run in the configured `auto` dtypes (the training stages too).
FLOAT32_STAGES = ("ground_truth", "capture")


def float32_notice(cfg: Config) -> str | None:
    """One line when the run's `auto` dtypes resolve to float32 on this CPU, which has no bf16 units: the run
    is correct, but several times slower than on a CPU with them, and a reader expecting the README's Intel
    time should know before the first long stage, not from the capture notebook's stderr."""
    from posae.data.models import has_native_bf16, resolve_device

    autos = [what for what, dtype in (("capture", cfg.model.dtype), ("training", cfg.train.dtype)) if dtype == "auto"]
    device = resolve_device(cfg.model.device)
    if not autos or device.type != "cpu" or has_native_bf16(device):  # what `auto` itself asks (resolve_dtype)
        return None
    return (f"note: this CPU has no bf16 units (neither AVX512-BF16 nor AMX), so {' and '.join(autos)} "
            f"{'run' if len(autos) > 1 else 'runs'} in "
            f"float32 (dtype: auto): expect several times the run time of a CPU with them (README, Quick start)")


def render_html(notebook: Path, html: Path) -> None:
    import nbformat
    from nbconvert import HTMLExporter

    body, _ = HTMLExporter().from_notebook_node(nbformat.read(notebook, as_version=4))
    write_text_atomic(html, body)


def execute(cfg: Config, stage: Stage) -> Path:
    """Run one notebook through papermill; returns the executed notebook's path."""
    import papermill as pm

    from posae.pipeline.kernels import QuietKernelManager

    out_dir = run_dir(cfg.name) / "notebooks"
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{stage.output_stem}.ipynb"
    if out.is_symlink():  # papermill writes through a link; the executed notebook belongs here, not at its target
        out.unlink()
    try:
        with _environ({"POSAE_PROGRESS": "summary"}):  # one line per loop in the saved notebook, not every refresh
            pm.execute_notebook(str(NOTEBOOKS_DIR / stage.notebook), str(out), parameters=stage.parameters,
                                cwd=str(NOTEBOOKS_DIR), kernel_name="python3", progress_bar=False,
                                kernel_manager_class=QuietKernelManager)
    except pm.PapermillExecutionError as e:
        raise StageFailed(f"stage {stage.name} failed in {stage.notebook}: {e.ename}: {e.evalue}\n"
                          f"The failed notebook is saved at {out}") from None
    render_html(out, out.with_suffix(".html"))
    return out


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)}m{seconds % 60:04.1f}s"


# Every training run, whatever the executor, gets one thread: the thread count changes how
# floating-point reductions are split, so pinning it is what makes the local and Dask executors'
# SAE weights (and every table computed from them) identical byte for byte.
TRAIN_THREADS = 1


def default_jobs() -> int:
    """How many training runs go side by side: one per core, each single-threaded.

    An SAE step at batch 1024 gains little from a second thread (46k vs 41k tokens/s measured here),
    so single-threaded trainings side by side give the most throughput.
    """
    return max(1, os.cpu_count() or 1)


def _thread_env(n: int) -> dict[str, str]:
    """What pins a process (or a kernel started from it) to `n` threads: torch reads POSAE_THREADS
    through `posae.notebook.setup`, the BLAS and OpenMP runtimes their own variables."""
    return {k: str(n) for k in ("POSAE_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@contextlib.contextmanager
def _environ(values: dict[str, str | None]):
    """Set (or, for None, unset) these variables inside; kernels started inside inherit them."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        yield
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def _threads_per_kernel(n: int):
    return _environ(_thread_env(n))


class _Run:
    """One call of `reproduce`: what decides whether a stage runs, and what a finished stage leaves.

    A stage's records and product checks are read once per call and kept (`_records`, `_checked`): a
    product checked, or written, earlier in the call is not hashed again when a later stage asks.
    """

    def __init__(self, cfg: Config, stages: list[Stage], fps: dict[str, str], force: tuple[str, ...], total: int,
                 log: Callable[[str], None]):
        self.cfg, self.fps, self.force, self.total, self._log = cfg, fps, force, total, log
        self.stages = {s.name: s for s in stages}
        self.start = time.perf_counter()
        self._records: dict[str, tuple[dict | None, str | None]] = {}
        self._checked: dict[str, list[tuple[str, Path | None]]] = {}
        self._lock = threading.Lock()  # the training stages ask from several threads
        self._say = threading.Lock()
        self._noticed = False

    def log(self, line: str) -> None:
        with self._say:  # two training stages finishing at once must not print into one line
            self._log(line)

    def head(self, i: int, stage: Stage) -> str:
        return f"[{i}/{self.total}] {stage.name}"

    def record(self, name: str) -> tuple[dict | None, str | None]:
        with self._lock:
            if name not in self._records:
                self._records[name] = read_record(self.cfg, self.stages[name])
            return self._records[name]

    def problems(self, name: str) -> list[tuple[str, Path | None]]:
        """What of the stage's recorded products is missing or changed (nothing to check without a record)."""
        record, _ = self.record(name)
        with self._lock:
            if name not in self._checked:
                recorded = (record or {}).get("products")
                self._checked[name] = ([] if recorded is None else
                                       product_problems(products(self.cfg, self.stages[name]), recorded))
            return self._checked[name]

    def why_not_done(self, stage: Stage) -> str | None:
        """None when `stage` is done: its record's fingerprint matches, every product it owns is there with its
        recorded size and digest, and its upstream stages' products are the ones it read. Otherwise why not
        ('' when it never finished: nothing to say). Changed product files are removed here, so that the
        rerun writes them afresh instead of reusing them (notebook 04 reuses its tables' rows, for one)."""
        record, unreadable = self.record(stage.name)
        if unreadable or record is None:
            return unreadable or ""
        problems = self.problems(stage.name)
        if record.get("fingerprint") != self.fps[stage.name]:
            changed = [p for p in problems if p[1] is not None]  # what is missing, the rerun simply makes
            return ("its notebook, parameters, config files or an upstream stage changed"
                    + (f"; and {self.remove_changed(stage, changed)}" if changed else ""))
        if problems:
            return self.remove_changed(stage, problems)
        if "products" not in record:
            return "its record predates product digests"
        for dep in stage.depends:
            if record.get("upstream", {}).get(dep) != products_digest(self.record(dep)[0]):
                return f"the products of {dep} changed since it ran"
        return None

    def remove_changed(self, stage: Stage, problems: list[tuple[str, Path | None]]) -> str:
        for _, file in problems:
            if file is not None:
                file.unlink(missing_ok=True)
        why, file = problems[0]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        with self._lock:
            self._checked[stage.name] = [(w, None) for w, _ in problems]  # removed: not to be removed again
        return why + ("; removed, the stage writes it again" if file is not None else "") + more

    def up_to_date(self, i: int, stage: Stage) -> bool:
        forced = stage.name in self.force or ("train" in self.force and stage.name.startswith("train:"))
        why = self.why_not_done(stage)
        if why is None and not forced:
            self.log(f"{self.head(i, stage)}: up to date, skipped")
            return True
        if why:
            self.log(f"{self.head(i, stage)}: rerunning: {why}")
        return False

    def check_upstream(self, i: int, stage: Stage) -> dict[str, str | None]:
        """Before `stage` runs: the products of the stages it reads, as recorded (a stage left out by --only
        is not rerun, so it must be intact); returns their digests, for the record. A stage that never
        finished through the driver has nothing recorded: its products are left to the notebook to find."""
        for dep in stage.depends:
            record, unreadable = self.record(dep)
            problems = [(unreadable, None)] if unreadable else self.problems(dep)
            if problems:
                raise UpstreamNotReady(
                    f"stage {stage.name} not run: it reads the products of {dep}, which --only leaves out, and one "
                    f"is not as recorded: {problems[0][0]}. Fix: drop --only (the driver then reruns {dep} first), "
                    f"or add {dep} to --only")
            if record is None:
                self.log(f"{self.head(i, stage)}: {dep} has no stage record (not run through the driver): "
                         "its products are not checked")
        return {dep: products_digest(self.record(dep)[0]) for dep in stage.depends}

    def starting(self, i: int, stage: Stage, what: str = "") -> None:
        if stage.name in FLOAT32_STAGES or stage.name.startswith("train:"):
            with self._lock:  # once, when the first stage it slows down starts (not when every one is skipped)
                first, self._noticed = not self._noticed, True
            if first and (notice := float32_notice(self.cfg)) is not None:
                self.log(notice)
        self.log(f"{self.head(i, stage)}: running {what or stage.notebook} ({self.total - i} after it; "
                 f"elapsed {_fmt(time.perf_counter() - self.start)})")

    def finish(self, i: int, stage: Stage, out: Path, seconds: float, upstream: dict[str, str | None]) -> dict:
        record = {"stage": stage.name, "fingerprint": self.fps[stage.name], "seconds": seconds, "notebook": str(out),
                  "finished": time.time(), "products": describe(stage, products(self.cfg, stage), out),
                  "upstream": upstream}
        write_json_atomic(record_path(self.cfg, stage), record)
        with self._lock:
            self._records[stage.name], self._checked[stage.name] = (record, None), []
        self.log(f"{self.head(i, stage)}: done in {_fmt(seconds)}")
        return {"stage": stage.name, "status": "ran", "seconds": seconds}

    def run_one(self, i: int, stage: Stage) -> dict:
        """Run one stage here, through papermill, unless it is up to date."""
        if self.up_to_date(i, stage):
            return {"stage": stage.name, "status": "skipped", "seconds": 0.0}
        upstream = self.check_upstream(i, stage)
        self.starting(i, stage)
        t0 = time.perf_counter()
        out = execute(self.cfg, stage)
        return self.finish(i, stage, out, time.perf_counter() - t0, upstream)


def reproduce(config: str = "default", force: tuple[str, ...] = (), only: tuple[str, ...] = (),
              variants: list[str] | None = None, log: Callable[[str], None] = print,
              jobs: int | None = None, executor: str = "local", scheduler: str | None = None,
              workers: int | None = None, overrides: list[str] | str | None = None) -> list[dict]:
    """Run the pipeline for `config` with `overrides` (``--set``: `posae.config.parse_overrides`); returns
    one row per stage (name, status, seconds).

    `force` reruns the named stages (and, through the fingerprints, nothing else is invalidated);
    `only` restricts the run to the named stages ("train" selects every training stage). The
    training stages, independent of each other, run side by side, every training run on one thread
    (`TRAIN_THREADS`). With `executor="local"` they run `jobs` notebooks at a time (default:
    `default_jobs()`). With `executor="dask"` each run (variant × layer × seed) is a Dask task and
    each variant's notebook a task after its runs, on the scheduler at `scheduler` or, without one,
    on a LocalCluster of `workers` single-threaded workers started here (default: `default_jobs()`).
    The other stages run here in both cases, so both executors leave the same products. Every notebook
    gets the same overrides (`with_overrides`), so each loads the config the driver loaded.
    """
    # Every argument is checked before anything is written: a bad one must not wait for the capture stage.
    check_executor(executor, scheduler, workers, jobs)
    jobs = default_jobs() if jobs is None else jobs
    cfg = load_config(config, overrides=overrides)  # validates everything before any stage runs
    if variants is not None:
        from posae.saes import check_variants

        check_variants(cfg, variants)  # unknown, repeated or no names
    stages = with_overrides(cfg, stage_list(cfg, variants))
    known = {s.name for s in stages} | {"train"}
    for name in (*force, *only):
        if name not in known:
            raise UnknownStage(f"unknown stage {name!r}. Fix: use one of {', '.join(sorted(known))}")
    selected = [s for s in stages if not only or s.name in only or ("train" in only and s.name.startswith("train:"))]
    for name in force:  # a forced stage that --only leaves out would silently not run
        if not any(s.name == name or (name == "train" and s.name.startswith("train:")) for s in selected):
            raise UnknownStage(f"--force {name}: --only {','.join(only)} leaves that stage out, so it would not run. "
                               f"Fix: add it to --only, or drop it from --force")
    check_writable(run_dir(cfg.name))  # an unwritable output fails now, not after the first stage
    with driver_lock(cfg, config):
        return _reproduce(cfg, stages, selected, force, log, jobs, executor, scheduler, workers)


def with_overrides(cfg: Config, stages: list[Stage]) -> list[Stage]:
    """The stages with `cfg`'s overrides among their parameters (a list of key=value: papermill passes it
    whole, commas in values included), `config` naming the file they apply to; unchanged without overrides,
    so the fingerprints of a config without them stay what they were."""
    if not cfg.overrides:
        return stages
    common = {"config": config_parameter(read_config(cfg.source)), "overrides": list(cfg.overrides)}
    return [dataclasses.replace(s, parameters={**s.parameters, **common}) for s in stages]


def driver_lock(cfg: Config, config: str):
    """One driver per config: a second one stops at once, naming the first (a killed driver's lock is free)."""
    sets = "".join(f" --set {o}" for o in cfg.overrides)
    return locked(lock_path(run_dir(cfg.name), "driver"), f"reproduce --config {config}{sets}", wait=False,
                  busy_fix="Fix: wait for that run to finish, or stop it (kill {pid}) and rerun: a stopped "
                           "driver's lock is released at once and the rerun resumes where it stopped")


def _reproduce(cfg: Config, stages: list[Stage], selected: list[Stage], force: tuple[str, ...],
               log: Callable[[str], None], jobs: int, executor: str, scheduler: str | None,
               workers: int | None) -> list[dict]:
    fps: dict[str, str] = {}
    for stage in stages:
        fps[stage.name] = fingerprint(stage, cfg, fps)
    run = _Run(cfg, stages, fps, force, len(selected), log)
    # The other stages keep this process's thread settings, whatever starting a cluster did to them.
    own_threads = {k: os.environ.get(k) for k in _thread_env(TRAIN_THREADS)}
    rows: list[dict] = []
    numbered = list(enumerate(selected, 1))
    trains = [(i, s) for i, s in numbered if s.name.startswith("train:")]
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(DaskPool(scheduler, workers or jobs, log)) if executor == "dask" else None
        for i, stage in numbered:
            if not stage.name.startswith("train:"):
                with _environ(own_threads):
                    rows.append(run.run_one(i, stage))
            elif (i, stage) == trains[0]:
                rows.extend(_run_parallel(run, trains, jobs) if pool is None else _run_on_dask(run, trains, pool))
    publish_renders(cfg)
    log(f"all {run.total} stages finished in {_fmt(time.perf_counter() - run.start)}")
    return rows


def publish_renders(cfg: Config) -> Path:
    """Copy the HTML renders beside the figures, so a reader sees every notebook without running one."""

    out = figures_dir(cfg.name) / "notebooks"
    for html in sorted((run_dir(cfg.name) / "notebooks").glob("*.html")):
        write_text_atomic(out / html.name, html.read_text())
    return out


def _run_parallel(run: _Run, stages: list[tuple[int, Stage]], jobs: int) -> list[dict]:
    """Run independent stages `jobs` at a time, one thread each; the first failure stops the rest from starting."""
    with _threads_per_kernel(TRAIN_THREADS):
        if jobs == 1 or len(stages) == 1:
            return [run.run_one(i, s) for i, s in stages]
        from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

        with ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(run.run_one, i, s) for i, s in stages]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for f in pending:
                f.cancel()
            for f in futures:
                if f.done() and not f.cancelled() and f.exception() is not None:
                    raise f.exception()
            return [f.result() for f in futures]


# --------------------------------------------------------------------------- the Dask executor
#
# Scale-out: each training run (variant × layer × seed) is one Dask task calling
# `posae.train.train_variant` for that layer and seed; each variant's 03 notebook is one task after
# its runs (it finds them finished, so it only draws and renders), and the variant's stage record
# is written here when it returns, exactly as the local executor writes it. The other stages
# (capture, structure, probes, ablations, figures) run on this machine as with the local executor.
# 04 stays whole: probe_all and evaluate_all each rewrite one shared CSV by read-merge-write, and
# probe_all keeps no per-run cache that a whole-04 notebook could reuse, so per-variant tasks
# would race on the CSVs or compute everything twice.
#
# Workers must see the same filesystem (runs/, the model cache) at the same paths and run the same
# checkout and venv: tasks read and write runs/<config>/ directly. The paths and the thread
# pinning travel with every task, since remote workers do not inherit this process's environment.

CONNECT_TIMEOUT = "10s"
_ENV_PASSTHROUGH = ("HF_HOME", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE",
                    "TOKENIZERS_PARALLELISM", "POSAE_DEVICE")  # POSAE_DEVICE: --device (posae.config)
EXECUTORS = ("local", "dask")


class ExecutorError(RuntimeError):
    """The Dask executor cannot run: dask missing, scheduler unreachable, workers that do not see the runs."""


def check_executor(executor: str, scheduler: str | None, workers: int | None, jobs: int | None = None) -> None:
    """How the stages are to run (--executor, --scheduler, --workers, --jobs), checked before any of them does."""
    if jobs is not None and jobs < 1:
        raise ExecutorError(f"--jobs {jobs}: at least one training notebook must run at a time. Fix: pass "
                            f"--jobs 1 or more, or leave it out for one per core ({default_jobs()})")
    if executor not in EXECUTORS:
        raise ExecutorError(f"unknown executor {executor!r}. Fix: use one of {', '.join(EXECUTORS)}")
    if executor != "dask" and (scheduler or workers is not None):
        raise ExecutorError("--scheduler and --workers belong to the Dask executor. Fix: add --executor dask")
    if scheduler and workers:
        raise ExecutorError(f"--workers sizes the LocalCluster started when there is no --scheduler; the "
                            f"cluster at {scheduler} has its own workers. Fix: drop --workers (scale the "
                            "cluster itself, e.g. cluster.scale(jobs=...))")
    if workers is not None and workers < 1:
        raise ExecutorError(f"--workers {workers}: need at least 1 worker. Fix: pass --workers 1 or more, or leave "
                            f"it out for one per core ({default_jobs()})")


def task_env(cfg: Config) -> dict[str, str]:
    """The environment every task runs in: absolute product paths, one thread, the hub settings."""
    from posae.paths import cache_dir, runs_root

    env = {"POSAE_RUNS": str(runs_root().resolve()), "POSAE_FIGURES": str(figures_dir(cfg.name).parent.resolve()),
           "POSAE_CACHE": str(cache_dir().resolve()), **_thread_env(TRAIN_THREADS)}
    env.update({k: os.environ[k] for k in _ENV_PASSTHROUGH if k in os.environ})
    return env


def _enter(env: dict[str, str]) -> None:
    """Take the client's environment in a worker (kernels started by papermill inherit it too)."""
    os.environ.update(env)
    import torch

    torch.set_num_threads(int(env["POSAE_THREADS"]))


def train_task(config: str, variant: str, layer: int, seed: int, env: dict[str, str],
               overrides: list[str] | None = None) -> float:
    """One training run on a worker (skipped when already finished); returns its seconds."""
    _enter(env)
    from posae.train import train_variant

    t0 = time.perf_counter()
    train_variant(load_config(config, check_model=False, overrides=overrides), variant, [layer], [seed], progress=False)
    return time.perf_counter() - t0


def notebook_task(cfg: Config, stage: Stage, env: dict[str, str], runs: list[float]) -> tuple[str, float]:
    """A variant's 03 notebook on a worker, once its runs are trained; returns (notebook, its seconds + theirs)."""
    _enter(env)
    t0 = time.perf_counter()
    out = execute(cfg, stage)
    return str(out), time.perf_counter() - t0 + sum(runs)


def _worker_check(runs: str, config_name: str) -> str | None:
    path = Path(runs) / config_name
    return None if path.is_dir() else f"does not see {path}"


class DaskPool:
    """A Dask client: connected to `scheduler`, or to a LocalCluster started on first use and closed at exit."""

    def __init__(self, scheduler: str | None, workers: int, log: Callable[[str], None]):
        try:
            import distributed  # noqa: F401
        except ImportError:
            raise ExecutorError("--executor dask needs dask and distributed, which are not installed. "
                                "Fix: pip install -e '.[dask]'") from None
        self.scheduler, self.workers, self.log = scheduler, workers, log
        self._client = self._cluster = None
        if scheduler:  # fail before any stage runs
            self._client = self._connect(scheduler)

    def __enter__(self) -> "DaskPool":
        return self

    def __exit__(self, *exc) -> None:
        if self._client is not None:
            self._client.close()
        if self._cluster is not None:
            self._cluster.close()

    def _connect(self, address: str):
        from distributed import Client

        try:
            client = Client(address, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as e:
            raise ExecutorError(
                f"cannot reach the Dask scheduler at {address} ({type(e).__name__}: {e}). Fix: start the "
                "scheduler first (`dask scheduler`, or a dask-jobqueue cluster: pass its cluster.scheduler_address), "
                "check the address and that this machine can reach that port; or leave out --scheduler to "
                "start a LocalCluster here") from None
        n = len(client.scheduler_info().get("workers", {}))
        self.log(f"connected to the Dask scheduler at {address} ({n} workers"
                 f"{'; tasks wait until workers join' if n == 0 else ''})")
        return client

    def client(self):
        if self._client is None:
            from distributed import Client, LocalCluster

            # Processes, one thread each: training runs share no GIL, and each is pinned to one thread anyway.
            # The nanny sets OMP_NUM_THREADS=1 & co. in *this* process and leaves them; `reproduce`
            # runs the stages here (capture, probes) with the thread settings it started with.
            self._cluster = LocalCluster(n_workers=self.workers, threads_per_worker=1, processes=True,
                                         dashboard_address=":0")
            self._client = Client(self._cluster)
            self.log(f"started a Dask LocalCluster: {self.workers} workers x 1 thread")
        return self._client

    def check_workers(self, cfg: Config, env: dict[str, str]) -> None:
        """Every worker must import posae and see runs/<config>/ (a shared filesystem)."""
        if not run_dir(cfg.name).is_dir():
            return  # nothing captured yet here either: the tasks fail with the store's own message
        try:
            seen = self.client().run(_worker_check, env["POSAE_RUNS"], cfg.name)
        except Exception as e:  # a worker that cannot unpickle the check cannot import posae
            raise ExecutorError(f"a Dask worker cannot run posae's tasks ({type(e).__name__}: {e}). Fix: workers "
                                "need this repository's checkout and venv (posae installed, `pip install -e '.[dask]'`)") from None
        bad = {w: msg for w, msg in seen.items() if msg}
        if bad:
            worker, msg = next(iter(bad.items()))
            raise ExecutorError(f"Dask worker {worker} {msg}: workers must share this machine's filesystem at "
                                f"the same paths ({len(bad)} of {len(seen)} do not). Fix: put runs/ (POSAE_RUNS) on "
                                "a filesystem every worker mounts at the same path")


def _task_failed(stage: Stage, error: BaseException, run: tuple[int, int] | None) -> StageFailed:
    if isinstance(error, StageFailed):  # raised by `execute` on the worker: already the local message
        return error
    msg = f"stage {stage.name} failed in {stage.notebook}: {type(error).__name__}: {error}"
    if run is not None:
        layer, seed = run
        overrides = stage.parameters.get("overrides")
        msg += (f"\nThe failed Dask task trained layer {layer}, seed {seed}. To see the traceback, run it alone: "
                f"papermill notebooks/{stage.notebook} out.ipynb -p config {stage.parameters['config']} "
                f"-p variant {stage.parameters['variant']} -y 'layers: [{layer}]' -y 'seeds: [{seed}]'"
                + (f" -y '{json.dumps({'overrides': overrides})}'" if overrides else ""))
    return StageFailed(msg)


def _run_on_dask(run: _Run, stages: list[tuple[int, Stage]], pool: DaskPool) -> list[dict]:
    """The training stages as Dask tasks: one per run, then the variant's notebook; first failure stops all."""
    rows: dict[str, dict] = {}
    todo, upstream = [], {}
    for i, stage in stages:
        if run.up_to_date(i, stage):
            rows[stage.name] = {"stage": stage.name, "status": "skipped", "seconds": 0.0}
        else:
            upstream[stage.name] = run.check_upstream(i, stage)
            todo.append((i, stage))
    if todo:
        from distributed import as_completed

        client = pool.client()
        env = task_env(run.cfg)
        pool.check_workers(run.cfg, env)
        tag = uuid.uuid4().hex[:8]
        what: dict = {}  # future -> (i, stage, (layer, seed) or None for the notebook)
        for i, stage in todo:
            variant, config = stage.parameters["variant"], stage.parameters["config"]
            runs = []
            for layer, seed in train_runs(run.cfg, stage):
                f = client.submit(train_task, config, variant, layer, seed, env, stage.parameters.get("overrides"),
                                  pure=False,
                                  key=f"posae-train-{variant}-layer{layer}-seed{seed}-{tag}")
                what[f] = (i, stage, (layer, seed))
                runs.append(f)
            # Submitted right after its runs, so it outranks later variants' runs: records arrive early.
            nb = client.submit(notebook_task, run.cfg, stage, env, runs, pure=False,
                               key=f"posae-notebook-{variant}-{tag}")
            what[nb] = (i, stage, None)
            run.starting(i, stage, f"{len(runs)} training tasks, then {stage.notebook}, on Dask")
        for future in as_completed(list(what)):
            i, stage, _ = what[future]
            if future.status != "finished":
                # The root cause is a run of this stage when one failed; the notebook only inherits it.
                failed = [(f, r) for f, (_, s, r) in what.items() if s.name == stage.name and r and f.status == "error"]
                f, r = failed[0] if failed else (future, None)
                try:  # before cancelling, which forgets it
                    error = f.exception(timeout=10)
                except Exception as e:  # cancelled or lost: that is the error
                    error = e
                client.cancel(list(what))
                raise _task_failed(stage, error, r)
            if what[future][2] is None:
                out, seconds = future.result()
                rows[stage.name] = run.finish(i, stage, Path(out), seconds, upstream[stage.name])
    return [rows[s.name] for _, s in stages]

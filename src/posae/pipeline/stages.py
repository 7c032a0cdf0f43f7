"""The stages of a reproduction: the stage list, fingerprints, records and the products each stage owns.

A stage is one executed notebook (03_train once per variant). Each finished stage leaves a record,
``runs/<config>/stages/<stage>.json``, holding its fingerprint (a content hash of the notebook, its
parameters, the config files it reads and the fingerprints of the stages it depends on), the size
and digest of every file of the products it owns (`products`: stores, run folders, CSVs, figures),
and the digest of each upstream stage's products as they were when it ran. A stage is done, and
skipped, only when all three still hold: its fingerprint matches, every product is there with its
recorded size and digest (sha256, all re-hashed on every run: ~1.5 s for the default config's
1.5 GB), and its upstream stages' products are the ones it read. So a second run does nothing, an
interrupted run resumes at the first unfinished stage, changing one variant's YAML reruns that
variant's training and what reads it (probes, ablations, figures) only, and a deleted, truncated or
edited product reruns the stage that owns it (saying which file and why) and, when the repaired
products differ, what reads them. Under --only, a stage whose upstream products are not as recorded
stops before it starts (`UpstreamNotReady`). Inside a stage the notebooks skip finished work too (a
complete activation store, a finished SAE run), so a stage killed midway resumes cheaply.

This module is the stage list and its bookkeeping; `posae.pipeline.driver` runs the stages.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from posae.config import Config
from posae.paths import NOTEBOOKS_DIR, PARAMS_DIR, figures_dir, run_dir, sae_dir


class UnknownStage(ValueError):
    """A --force/--only name that is not a stage of the stage list."""


class StageFailed(RuntimeError):
    """A notebook raised; the message carries its error and the path of the saved failed notebook."""


class UpstreamNotReady(StageFailed):
    """A stage about to run (under --only) needs products of a stage that is not run now, and one of them
    is missing or not as recorded; the message names it and the fix. Raised before the stage starts."""


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


def config_parameter(cfg: Config) -> str:
    """What the notebooks get as `config`: the name of a file under params/, else the file's absolute
    path (a kernel runs in notebooks/, and a config's `name:` may differ from its file name)."""
    source = Path(cfg.source).resolve()
    return cfg.name if source == (PARAMS_DIR / f"{cfg.name}.yaml").resolve() else str(source)


INSPECTED = ("baseline", "contrastive", "hierarchical")  # the runs notebook 07 shows in a reproduction


def stage_list(cfg: Config, variants: list[str] | None = None) -> list[Stage]:
    """The stages of a full reproduction of `cfg`, in order."""
    from posae.saes import variant_path

    variants = variant_names() if variants is None else variants
    p = {"config": config_parameter(cfg)}
    trains = [Stage(f"train:{v}", "03_train.ipynb", {**p, "variant": v}, ("capture",),
                    (variant_path(v),)) for v in variants]
    train_names = tuple(s.name for s in trains)
    variant_files = tuple(f for s in trains for f in s.inputs)
    every_variant = tuple(variant_path(v) for v in variant_names())  # the ground truth trains them all
    # Notebook 07 shows a few runs side by side: these where the reproduction trains them, else the first three.
    inspected = [v for v in INSPECTED if v in variants] or variants[:3]
    return [
        Stage("ground_truth", "00_ground_truth.ipynb", p, (), every_variant),
        Stage("capture", "01_capture_activations.ipynb", p),
        Stage("structure", "02_position_structure.ipynb", p, ("capture",)),
        *trains,
        Stage("probe", "04_probe.ipynb", p, ("capture", *train_names), variant_files),
        Stage("ablations", "05_ablations.ipynb", p, ("capture", *train_names), variant_files),
        Stage("inspect", "07_inspect.ipynb", {**p, "variants": inspected},
              ("capture", *(f"train:{v}" for v in inspected)), tuple(variant_path(v) for v in inspected)),
        Stage("figures", "06_figures.ipynb", p, ("structure", "probe", "ablations", *train_names), variant_files),
    ]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def fingerprint(stage: Stage, cfg: Config, upstream: dict[str, str]) -> str:
    blob = {
        "notebook": _file_digest(NOTEBOOKS_DIR / stage.notebook),
        "parameters": stage.parameters,
        "config": _file_digest(Path(cfg.source)),
        **({"bases": [_file_digest(Path(b)) for b in cfg.bases]} if cfg.bases else {}),  # base: files it inherits
        "inputs": {str(p.name): _file_digest(p) for p in stage.inputs},
        "upstream": {d: upstream[d] for d in stage.depends},
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def record_path(cfg: Config, stage: Stage) -> Path:
    return run_dir(cfg.name) / "stages" / f"{stage.name.replace(':', '-')}.json"


def read_record(cfg: Config, stage: Stage) -> tuple[dict | None, str | None]:
    """(the stage's record or None where there is none, why it cannot be read or None)."""
    path = record_path(cfg, stage)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None, None
    except (ValueError, UnicodeDecodeError) as e:
        return None, f"its record {path.relative_to(run_dir(cfg.name))} is not valid JSON ({e}), so it is not done"
    if not isinstance(record, dict):
        return None, f"its record {path.relative_to(run_dir(cfg.name))} is not a JSON object, so it is not done"
    return record, None


# --------------------------------------------------------------------------- the products a stage owns


@dataclass(frozen=True)
class Product:
    """A file or folder a stage writes. `key` names it in the stage record, relative to runs/<config>/ (or
    figures/ for the figures), so a copied runs folder keeps its records; `shown` is what a message says."""

    key: str
    path: Path
    shown: str


def _in_run(cfg: Config, path: Path) -> Product:
    key = path.relative_to(run_dir(cfg.name)).as_posix()
    return Product(key, path, key)


def _capture_products(cfg: Config, stage: Stage) -> list[Product]:
    from posae.data.capture import store_paths

    # A derived config's stores may be its ancestor's (`Config.stores_name`): keyed from this run all the same.
    keys = {p: Path(os.path.relpath(p, run_dir(cfg.name))).as_posix() for p in store_paths(cfg).values()}
    return [Product(key, p, key) for p, key in keys.items()]


def _ground_truth_products(cfg: Config, stage: Stage) -> list[Product]:
    from posae.eval.ground_truth import GROUND_TRUTH_CSV, ground_truth_dir, run_folders

    return [_in_run(cfg, ground_truth_dir(cfg) / GROUND_TRUTH_CSV), *(_in_run(cfg, f) for f in run_folders(cfg))]


def _structure_products(cfg: Config, stage: Stage) -> list[Product]:
    out = run_dir(cfg.name) / "notebooks" / f"{stage.output_stem}.ipynb"  # structure writes no file of its own
    return [_in_run(cfg, out), _in_run(cfg, out.with_suffix(".html"))]


def train_runs(cfg: Config, stage: Stage) -> list[tuple[int, int]]:
    """(layer, seed) of each run of a training stage, in the order notebook 03 trains them."""
    from posae.saes import variant_config

    try:
        seeds = variant_config(cfg, stage.parameters["variant"]).train.seeds
    except Exception as e:  # an unknown variant: the same message the notebook would fail with
        raise StageFailed(f"stage {stage.name} failed in {stage.notebook}: {type(e).__name__}: {e}") from None
    return [(layer, seed) for layer in cfg.capture.layers for seed in seeds]


def _inspect_products(cfg: Config, stage: Stage) -> list[Product]:
    from posae.inspect import INSPECT_CSV

    return [*_structure_products(cfg, stage), _in_run(cfg, run_dir(cfg.name) / INSPECT_CSV)]


def _train_products(cfg: Config, stage: Stage) -> list[Product]:
    variant = stage.parameters["variant"]
    return [_in_run(cfg, sae_dir(cfg.name, variant, layer, seed)) for layer, seed in train_runs(cfg, stage)]


def _table_products(*names: str) -> Callable[[Config, Stage], list[Product]]:
    return lambda cfg, stage: [_in_run(cfg, run_dir(cfg.name) / name) for name in names]


def _probe_products(cfg: Config, stage: Stage) -> list[Product]:
    from posae.eval.fidelity import FIDELITY_BY_POSITION_CSV, FIDELITY_CSV
    from posae.eval.metrics import BY_POSITION_CSV, FEATURES_CSV, METRICS_CSV
    from posae.eval.probes import PROBES_CSV
    from posae.report.figures import probe_outputs

    return _table_products(METRICS_CSV, BY_POSITION_CSV, FEATURES_CSV, PROBES_CSV, FIDELITY_CSV,
                           FIDELITY_BY_POSITION_CSV)(cfg, stage) + _figures(probe_outputs(figures_dir(cfg.name)))


def _ablation_products(cfg: Config, stage: Stage) -> list[Product]:
    from posae.eval.ablations import ABLATIONS_CSV, ABLATIONS_RUNS_CSV

    return _table_products(ABLATIONS_CSV, ABLATIONS_RUNS_CSV)(cfg, stage)


def _figures(paths: list[Path]) -> list[Product]:
    return [Product(f"figures/{p.name}", p, str(p)) for p in paths]


def _figure_products(cfg: Config, stage: Stage) -> list[Product]:
    from posae.report.figures import expected_outputs

    return _figures(expected_outputs(figures_dir(cfg.name)))


# Stage kind (its name before any ":") -> what it owns; a kind not listed owns nothing beyond its record.
_PRODUCTS: dict[str, Callable[[Config, Stage], list[Product]]] = {
    "ground_truth": _ground_truth_products, "capture": _capture_products, "structure": _structure_products,
    "train": _train_products, "probe": _probe_products, "ablations": _ablation_products, "inspect": _inspect_products,
    "figures": _figure_products,
}


def products(cfg: Config, stage: Stage) -> list[Product]:
    """Every product `stage` writes for `cfg`: store folders, run folders, CSVs, figures."""
    owner = _PRODUCTS.get(stage.name.split(":", 1)[0])
    return owner(cfg, stage) if owner else []


def _files(product: Product) -> dict[str, Path]:
    """record key -> file, for each file of a product (a folder's files, hidden ones aside: locks and temps)."""
    if not product.path.is_dir():
        return {product.key: product.path}
    return {f"{product.key}/{f.relative_to(product.path).as_posix()}": f for f in sorted(product.path.rglob("*"))
            if f.is_file() and not any(part.startswith(".") for part in f.relative_to(product.path).parts)}


def describe(stage: Stage, owned: list[Product], notebook: Path) -> dict[str, dict]:
    """The size and digest of every file of `owned`, for the record; a product the stage did not leave fails it."""
    from posae.data.store import file_record

    missing = [p.shown for p in owned if not p.path.exists()]
    if missing:
        raise StageFailed(f"stage {stage.name} ran to its end but left no {missing[0]}"
                          f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}. Fix: read the executed "
                          f"notebook {notebook}; rerun the stage once the cause is fixed")
    return {key: file_record(f) for p in owned for key, f in _files(p).items()}


def product_problems(owned: list[Product], recorded: dict[str, dict]) -> list[tuple[str, Path | None]]:
    """(why, the file to remove or None) for each product or file of `owned` that is not as `recorded`."""
    from posae.data.store import file_problem

    problems: list[tuple[str, Path | None]] = []
    for p in owned:
        keys = [k for k in recorded if k == p.key or k.startswith(p.key + "/")]
        if not p.path.exists() or not keys:
            problems.append((f"{p.shown} is {'missing' if not p.path.exists() else 'not in the stage record'}", None))
            continue
        for key in keys:
            file = p.path / key[len(p.key) + 1:] if key != p.key else p.path
            why = file_problem(file, recorded[key], shown=p.shown + key[len(p.key):])
            if why:
                problems.append((why, file if file.is_file() else None))
    return problems


def products_digest(record: dict | None) -> str | None:
    """One digest of every recorded product file of a stage: what a downstream stage's record keeps of it."""
    if record is None or "products" not in record:
        return None
    return hashlib.sha256(json.dumps(record["products"], sort_keys=True).encode()).hexdigest()[:16]



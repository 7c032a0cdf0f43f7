"""The SAE variants: a registry filled by the variant modules of this package, and the one way to build them.

Each module here defines one variant and registers it where it is defined::

    @register("multiscale")
    class MultiScale(Hierarchical): ...

Every module of this package is imported when the package is, so adding an eleventh variant is
adding one file (plus, optionally, ``params/variants/<name>.yaml``); nothing else changes. Callers
never branch on a variant's name: `build` and `variant_config` dispatch through `REGISTRY`.

A variant's settings come from three places, later ones winning:
the run config's ``sae``/``train`` sections, ``params/variants/<name>.yaml`` (only what the variant
changes), and in the run config ``sae.options.<name>`` (this config's values of the variant's own
options, e.g. the paper's attention width). The variant's ``options`` are checked against its
``Options`` dataclass: an unknown key or a wrong type fails with the file, the key and the fix.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from posae.config import (Config, ConfigError, SAEConfig, TrainConfig, build_dataclass, check_parameter, read_yaml,
                          to_dict)
from posae.paths import PARAMS_DIR
from posae.saes.base import SAE, ForwardOutput, NoOptions, dictionary_size, options_dict

__all__ = ["REGISTRY", "register", "get", "build", "variant_config", "variant_path", "check_variants",
           "SAE", "ForwardOutput", "NoOptions", "options_dict"]

REGISTRY: dict[str, type[SAE]] = {}


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    """Class decorator: make `cls` buildable as `name`. A second class under one name is an error."""

    def add(cls: type[SAE]) -> type[SAE]:
        old = REGISTRY.get(name)
        # Re-running the same definition (a module reloaded in a notebook) replaces it; anything else clashes.
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"variant {name!r} is registered twice: {old.__module__}.{old.__qualname__} and "
                             f"{cls.__module__}.{cls.__qualname__}. Fix: give one of them another name")
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return add


def get(name: str) -> type[SAE]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown variant {name!r}. Fix: use one of {', '.join(sorted(REGISTRY))}") from None


def variant_path(name: str) -> Path:
    """params/variants/<name>.yaml: the one place a variant's file is named (it need not exist)."""
    return PARAMS_DIR / "variants" / f"{name}.yaml"


def as_variant_list(variants: str | Iterable[str] | None) -> list[str] | None:
    """None, a list, or a comma-separated string (what `papermill -p variants a,b` passes)."""
    if variants is None:
        return None
    if isinstance(variants, str):
        names = [v.strip() for v in variants.split(",")]
    else:
        names = list(check_parameter("variants", variants, tuple[str, ...],
                                     'give a list or a comma-separated string, e.g. papermill -p variants baseline,contrastive'))
    names = [n for n in names if n]
    for name in names:
        get(name)  # an unknown name fails here, listing the known ones
    return names


def parse_options(name: str, options: dict[str, Any], where: str = "sae.options") -> Any:
    """The variant's Options instance from a plain mapping, validated (unknown keys, types, ranges)."""
    cls = get(name).Options
    return build_dataclass(cls, dict(options), where + ".")  # the prefix of each dotted key


def build(name: str, d_model: int, sae_cfg: SAEConfig, seq_len: int, seed: int = 0) -> SAE:
    """A freshly initialised SAE of variant `name`; the same seed gives the same weights."""
    cls = get(name)
    options = parse_options(name, sae_cfg.options, f"sae.options of {name}")
    return cls(d_model, sae_cfg, seq_len, options, torch.Generator().manual_seed(seed))


def variant_config(cfg: Config, name: str) -> Config:
    """`cfg` with variant `name`'s YAML applied; its ``sae.options`` are the variant's own, validated."""
    get(name)  # an unknown name fails here, listing the known ones
    path = variant_path(name)
    data = read_yaml(path) if path.exists() else {}
    unknown = sorted(set(data) - {"sae", "train"})
    if unknown:
        raise ConfigError(f"{path}: unknown section {unknown[0]!r}. Fix: a variant file holds only 'sae' and 'train'")
    sae_over = dict(data.get("sae") or {})
    train_over = dict(data.get("train") or {})
    own = sae_over.pop("options", None) or {}
    if not isinstance(own, dict):
        raise ConfigError(f"{path}: sae.options must be a mapping of {name}'s options, got {own!r}")
    per_config = cfg.sae.options.get(name, {}) if isinstance(cfg.sae.options, dict) else {}
    if not isinstance(per_config, dict):
        raise ConfigError(f"{cfg.source}: sae.options.{name} must be a mapping of {name}'s options, got {per_config!r}")
    options = options_dict(parse_options(name, {**own, **per_config}, f"{path} + {cfg.source}: sae.options"))
    sae_dict = {**to_dict(cfg.sae), **sae_over, "options": {}}
    sae = build_dataclass(SAEConfig, sae_dict, f"{path}: sae")
    sae = dataclasses.replace(sae, options=options)
    train = build_dataclass(TrainConfig, {**to_dict(cfg.train), **train_over}, f"{path}: train")
    return dataclasses.replace(cfg, sae=sae, train=train)


def check_variants(cfg: Config, names: list[str] | None = None, d_model: int | None = None) -> None:
    """Validate the run config's per-variant options and every variant file, before heavy work.

    `names` are the variants a run asks for (the driver's ``--variants``): each known, each once,
    at least one; None checks every registered variant. With `d_model` (the model's width), also
    that each variant can be built with the k = expansion x d features its settings give
    (`SAE.size_problem`: e.g. even for a split dictionary, enough position features for the buckets).
    """
    if names is not None:
        known = ", ".join(sorted(REGISTRY))
        if not names:
            raise ConfigError(f"--variants names no variant. Fix: give one or more of {known}, comma-separated, "
                              "or leave --variants out to train them all")
        for name in names:
            if name not in REGISTRY:
                raise ConfigError(f"--variants: unknown variant {name!r}. Fix: use one of {known}")
        repeated = sorted({n for n in names if list(names).count(n) > 1})
        if repeated:
            raise ConfigError(f"--variants names {repeated[0]} twice. Fix: name each variant once")
    options = cfg.sae.options
    if not isinstance(options, dict) or any(not isinstance(v, dict) for v in options.values()):
        raise ConfigError(f"{cfg.source}: sae.options must map variant names to their options. Fix: write "
                          f"it as e.g. {{contrastive: {{temperature: 0.1}}}}")
    for name in options:
        if name not in REGISTRY:
            raise ConfigError(f"{cfg.source}: sae.options.{name}: unknown variant. Fix: use one of "
                              f"{', '.join(sorted(REGISTRY))}")
    for name in names if names is not None else sorted(REGISTRY):
        sae = variant_config(cfg, name).sae
        if d_model is None:
            continue
        k = dictionary_size(sae.expansion, d_model)
        problem = REGISTRY[name].size_problem(k, d_model, sae)
        if problem is not None:
            raise ConfigError(f"{cfg.source}: sae.expansion {sae.expansion} gives the {name} SAE k = {k} features "
                              f"(d = {d_model}), which it cannot use: {problem}")


def _discover() -> None:
    """Import every module of this package so that each variant registers itself."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


_discover()

"""Everything that validates a config against the world: the model it names (its layers and context,
`posae.data.models.check_fit`), the corpus (`posae.data.corpus.check`) and the variants
(`posae.saes.check_variants`: sae.options' names, every params/variants/*.yaml, the k each variant gets).

`load_config` is here, not in `posae.config`: config.py is the schema and its YAML reader and imports
nothing of posae but `paths`, so nothing below it can pull the model code in; this module sits above
`data` and `saes` in the layers and imports them (saes late, for torch) without a cycle (`tests/test_architecture.py`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from posae.config import Config, ConfigError, read_config
from posae.data import models
from posae.data.capture import validate  # light: transformers loads only with a model


def load_config(name_or_path: str | Path = "default", check_model: bool = True, overrides: Any = None) -> Config:
    """Load and validate a run config, with `overrides` applied (`posae.config.read_config`: ``--set``, the
    notebooks' ``overrides``); raises ConfigError before any heavy work.

    With `check_model`, the layers are checked against the model's layer count and the model and
    corpus names against what can be loaded (offline where possible: see `posae.data.models`).
    """
    cfg = read_config(name_or_path, overrides)
    if check_model:
        try:
            check_world(cfg)
        except ConfigError as e:
            raise ConfigError(named_at_origin(cfg, str(e))) from None
    return cfg


_KEY_AFTER_FILE = re.compile(r"[a-z_]+(\.[A-Za-z0-9_]+)+")


def named_at_origin(cfg: Config, message: str) -> str:
    """`message` ("<cfg.source>: <dotted key> ...", as the world checks name a key) naming instead the base
    file or override that set the key, and which config inherited it; unchanged when the file set it."""
    head = f"{cfg.source}: "
    key = _KEY_AFTER_FILE.match(message[len(head):]) if message.startswith(head) else None
    origin = cfg.origin(key[0]) if key else cfg.source
    if origin == cfg.source:
        return message
    how = "applied to" if origin.startswith("override ") else "inherited by"
    problem, fix, rest = message[len(head):].partition(" Fix: ")
    return f"{origin}: {problem.rstrip('.')} ({how} {cfg.source}).{fix}{rest}"


def check_world(cfg: Config) -> models.ModelInfo:
    """The model, corpus and variant checks of a config; returns the model's ModelInfo. The model and
    corpus part is the capture's own check (`posae.data.capture.validate`, which configs built in code
    pass through too); the variants are added here."""
    info = validate(cfg)
    from posae.saes import check_variants  # late: torch; a config error should not wait for it

    check_variants(cfg, d_model=info.hidden_size)
    return info

"""Everything that validates a config against the world: the model it names (its layers and context,
`posae.data.models.check_fit`), the corpus (`posae.data.corpus.check`) and the variants
(`posae.saes.check_variants`: sae.options' names, every params/variants/*.yaml, the k each variant gets).

`load_config` is here, not in `posae.config`: config.py is the schema and its YAML reader and imports
nothing of posae but `paths`, so nothing below it can pull the model code in; this module sits above
`data` and `saes` in the layers and imports them (saes late, for torch) without a cycle (`tests/test_architecture.py`).
"""

from __future__ import annotations

from pathlib import Path

from posae.config import Config, read_config
from posae.data import models
from posae.data.capture import validate  # light: transformers loads only with a model


def load_config(name_or_path: str | Path = "default", check_model: bool = True) -> Config:
    """Load and validate a run config; raises ConfigError before any heavy work.

    With `check_model`, the layers are checked against the model's layer count and the model and
    corpus names against what can be loaded (offline where possible: see `posae.data.models`).
    """
    cfg = read_config(name_or_path)
    if check_model:
        check_world(cfg)
    return cfg


def check_world(cfg: Config) -> models.ModelInfo:
    """The model, corpus and variant checks of a config; returns the model's ModelInfo. The model and
    corpus part is the capture's own check (`posae.data.capture.validate`, which configs built in code
    pass through too); the variants are added here."""
    info = validate(cfg)
    from posae.saes import check_variants  # late: torch; a config error should not wait for it

    check_variants(cfg, d_model=info.hidden_size)
    return info

"""Shared fixtures. Every test writes its runs under a temporary POSAE_RUNS, never into the repo's runs/.

The smoke reproduction (every notebook through papermill on params/smoke.yaml) is expensive (a
kernel costs ~3 s), so it runs once per session and the tests read its products.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest

# Set before any posae import resolves a path, and inherited by papermill's kernels.
os.environ["POSAE_RUNS"] = tempfile.mkdtemp(prefix="posae-test-runs-")
os.environ["POSAE_FIGURES"] = tempfile.mkdtemp(prefix="posae-test-figures-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """`make test` runs two pytest-xdist workers. Every test file that uses the session's smoke reproduction
    goes, whole, to one worker, so the reproduction runs once while the other worker takes the rest test by test.
    (xdist's own `--dist loadgroup` marks do not group with pytest 9: it renames node ids the old way.)"""
    from xdist.scheduler import LoadScopeScheduling

    root = Path(config.rootpath)

    @functools.cache
    def uses_smoke(file: str) -> bool:
        return "smoke_reproduction" in (root / file).read_text()

    class SmokeFilesTogether(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            file = nodeid.split("::", 1)[0]
            return "smoke_reproduction" if uses_smoke(file) else nodeid

    return SmokeFilesTogether(config, log)


@pytest.fixture(scope="session")
def runs_root() -> Path:
    return Path(os.environ["POSAE_RUNS"])


@pytest.fixture(scope="session")
def smoke_reproduction(runs_root):
    """The whole smoke pipeline, once: returns the driver's rows (stage, status, seconds)."""
    from posae.pipeline.driver import reproduce

    rows = reproduce("smoke", log=lambda line: None)
    return rows


@pytest.fixture(scope="session")
def smoke_capture(runs_root):
    """Just the smoke activation stores (cheap: no papermill); returns {(layer, split): path}."""
    from posae.checks import load_config
    from posae.data.capture import capture

    return capture(load_config("smoke"), progress=False)


@pytest.fixture
def one_thread():
    """torch on one thread for the test (the unit tests' tensors are tiny: threads only add
    synchronisation, and on a busy machine each parallel op waits a time slice)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

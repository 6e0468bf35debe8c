"""Shared fixtures: where the real MedMNIST files live, and quiet, reproducible torch.

The suite runs in parallel workers (`-n auto`, pytest-xdist); each worker and the scripts it starts get an equal
share of the cores as torch threads, so that workers do not oversubscribe the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
os.environ["OMP_NUM_THREADS"] = str(_THREADS)  # the subprocesses the tests start
torch.set_num_threads(_THREADS)
# Nothing in the suite may reach the Hub: without a network a lookup costs half a minute of retries. huggingface_hub
# and datasets read this once, at import (after this file); the loopback download tests switch it off themselves.
os.environ["HF_HUB_OFFLINE"] = "1"

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("VIVIT_MEDMNIST_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The folder holding the real `adrenalmnist3d.npz` / `adrenalmnist3d_64.npz`.

    Skips (with the reason) on machines without it; `.ci/run` sets VIVIT_MEDMNIST_REQUIRE_SHARED_DATA=1 so
    that in CI a missing folder fails the test instead of silently skipping it.
    """
    if (SHARED_DATA / "adrenalmnist3d.npz").is_file():
        return SHARED_DATA
    reason = f"real MedMNIST data not found at {SHARED_DATA} (set VIVIT_MEDMNIST_SHARED_DATA)"
    if os.environ.get("VIVIT_MEDMNIST_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


# Fixtures that train or build something for several tests (tens of seconds each). Under `--dist loadgroup` the tests
# that share one are sent to the same worker, so that it is built once rather than once per worker.
SHARED_BUILDS = {
    "uninterrupted", "finished_run", "trained", "published", "model_dir", "synthetic", "saved", "saved_models",
    "exported", "wheel_env", "remote_results", "folder",
}  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist turns the markers into group names
def pytest_collection_modifyitems(items):
    for item in items:
        shared = sorted(set(getattr(item, "fixturenames", ())) & SHARED_BUILDS)
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}.{shared[0]}"))


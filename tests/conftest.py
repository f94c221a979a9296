"""Session fixtures shared across test packages: a tiny multi-exit model trained on real digits, and its export."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest

# Tests run on 2 shared cores: keep torch from oversubscribing them.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config: pytest.Config) -> None:
    """Property tests: the README's test command (scripts/test.sh, CI) runs them derandomized, so a run is
    reproducible; plain ``pytest`` explores fresh examples each time (``HYPOTHESIS_PROFILE=explore``)."""
    try:
        from hypothesis import settings
    except ImportError:  # the dev extra is missing; the property-test modules say so when they are collected
        return
    settings.register_profile("repeatable", derandomize=True, database=None)
    settings.register_profile("explore")
    name = os.environ.get("HYPOTHESIS_PROFILE", "explore")
    if name not in ("repeatable", "explore"):
        raise pytest.UsageError(f"HYPOTHESIS_PROFILE={name!r}: use repeatable (same examples every run) or explore")
    settings.load_profile(name)


TINY_DIGITS = {
    "name": "tiny-digits",
    "method": {"name": "multiexit", "num_exits": 4},
    "backbone": {"name": "vit_tiny_patch16_224",
                 "kwargs": {"img_size": 16, "patch_size": 4, "depth": 4, "embed_dim": 48, "num_heads": 3}},
    "data": {"spec": "digits"},
    "train": {"epochs": 6, "batch_size": 64, "lr": 3.0e-3, "warmup_epochs": 1, "seed": 0},
}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 4-exit ViT trained for a few epochs on the real digits data (session-wide; don't modify)."""
    from deploykit.train import train

    return Path(train(copy.deepcopy(TINY_DIGITS), out=tmp_path_factory.mktemp("runs") / "tiny-digits"))


@pytest.fixture(scope="session")
def trained_engine(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trained_run`` exported with the parity check (session-wide; copy before modifying)."""
    from deploykit.export import export_run

    out = tmp_path_factory.mktemp("engines") / "tiny-digits"
    export_run(trained_run, out)
    return out


@pytest.fixture
def engine_copy(trained_engine: Path, tmp_path: Path) -> Path:
    """A private copy of the exported engine, safe to modify."""
    import shutil

    dst = tmp_path / "engine"
    shutil.copytree(trained_engine, dst)
    return dst

import copy
import shutil
from pathlib import Path

import pytest

TINY = {
    "name": "tiny",
    "method": {"name": "multiexit", "num_exits": 2},
    "backbone": {"name": "vit_tiny_patch16_224", "kwargs": {"img_size": 16, "patch_size": 4, "depth": 2,
                                                            "embed_dim": 32, "num_heads": 2}},
    "data": {"spec": "digits"},
    "train": {"epochs": 2, "batch_size": 64, "lr": 1.0e-3, "warmup_epochs": 1, "seed": 0},
}


@pytest.fixture
def tiny_recipe() -> dict:
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """One tiny run (3 steps), trained once per session; copy it before changing it."""
    from deploykit.train import train

    return train(copy.deepcopy(TINY), out=tmp_path_factory.mktemp("runs") / "tiny", overrides={"train.max_steps": 3})


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(tiny_run, dst)
    return dst

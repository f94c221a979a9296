"""The layering holds: import-linter's contracts (pyproject.toml [tool.importlinter]) and a torch-free runtime."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_lint_imports_keeps_every_contract():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.skip("import-linter is not installed (pip install 'deploykit[dev]')")
    r = subprocess.run([exe, "--no-cache"], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout and "3 kept" in r.stdout


@pytest.mark.parametrize("module", ["deploykit.runtime.generation", "deploykit.runtime.engines",
                                    "deploykit.tune.mue_calibrate", "deploykit.tune.mue_bench",
                                    "deploykit.families"])
def test_onnx_runtime_path_does_not_import_torch(module):
    """A fresh interpreter importing the module (MuE's runtime among them) never loads torch, timm or methods/."""
    code = (f"import sys, {module}; bad = [m for m in ('torch', 'timm', 'deploykit.methods', 'deploykit.train') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr

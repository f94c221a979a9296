"""The staged swap of engine directories survives a kill at any step (real child processes killed mid-swap)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deploykit.staging import recover, staged_dir

_CHILD = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from deploykit import staging

    out, kill_after = Path(sys.argv[1]), int(sys.argv[2])
    real, calls = os.replace, []

    def replace(a, b):
        real(a, b)
        calls.append(b)
        if len(calls) == kill_after:
            os._exit(9)  # killed right after this rename, before the next step

    staging.os.replace = replace
    with staging.staged_dir(out) as tmp:
        (tmp / "deploykit.json").write_text("new")
        if kill_after == 0:
            os._exit(9)  # killed while writing
""")


def _engine(path: Path, text: str) -> None:
    path.mkdir(parents=True)
    (path / "deploykit.json").write_text(text)
    (path / "stage0.onnx").write_text(text)


def _kill_during_swap(out: Path, kill_after: int) -> None:
    r = subprocess.run([sys.executable, "-c", _CHILD, str(out), str(kill_after)], capture_output=True, text=True)
    assert r.returncode == 9, r.stderr


@pytest.mark.parametrize("kill_after, survivor", [(0, "old"), (1, "old"), (2, "new")])
def test_a_kill_at_any_step_leaves_a_whole_engine(tmp_path, kill_after, survivor):
    out = tmp_path / "engine"
    _engine(out, "old")
    _kill_during_swap(out, kill_after)
    recover(out)  # what the next export does first
    assert (out / "deploykit.json").read_text() == survivor
    if survivor == "old":
        assert (out / "stage0.onnx").read_text() == "old"  # graphs and manifest together
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]  # no .engine.tmp-* / .engine.old-* left


def test_kill_between_aside_and_in_leaves_the_old_engine_complete_beside(tmp_path):
    out = tmp_path / "engine"
    _engine(out, "old")
    _kill_during_swap(out, 1)
    aside = list(tmp_path.glob(".engine.old-*"))
    assert not out.exists() and len(aside) == 1 and (aside[0] / "stage0.onnx").read_text() == "old"
    with staged_dir(out) as tmp:  # the next run restores it, then swaps in its own
        assert (out / "deploykit.json").read_text() == "old"
        (tmp / "deploykit.json").write_text("newer")
    assert (out / "deploykit.json").read_text() == "newer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


def test_a_failed_build_keeps_the_old_engine_and_no_temp(tmp_path):
    out = tmp_path / "engine"
    _engine(out, "old")
    with pytest.raises(RuntimeError), staged_dir(out) as tmp:
        (tmp / "deploykit.json").write_text("half")
        raise RuntimeError("parity check failed")
    assert (out / "deploykit.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]

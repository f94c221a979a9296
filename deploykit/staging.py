"""All-or-nothing engine directories: write into a hidden sibling, swap it into place only when everything passed.

The swap is three renames on one filesystem: the old directory aside (``.NAME.old-*``), the new one in, the old one
removed. A kill at any moment leaves either the old engine or the new one at ``NAME`` (between the first two
renames, the old one sits complete beside it and the next run puts it back), never half of one; leftovers of
killed runs (``.NAME.tmp-*``, ``.NAME.old-*``) are cleaned by the next run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def _leftovers(out_dir: Path, kind: str) -> list[Path]:
    return sorted(out_dir.parent.glob(f".{out_dir.name}.{kind}-*"))


def recover(out_dir: Path) -> None:
    """Undo what a killed run left: restore an old directory set aside but never replaced, drop temp directories."""
    old = _leftovers(out_dir, "old")
    if old and not out_dir.exists():
        os.replace(old[-1], out_dir)  # killed between "old aside" and "new in": the old engine comes back
        old = old[:-1]
    for p in old + _leftovers(out_dir, "tmp"):
        shutil.rmtree(p, ignore_errors=True)


def swap_in(new: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` by ``new``: old aside -> new in -> old removed."""
    aside = None
    if out_dir.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, aside)  # an empty directory target is replaced atomically
    os.replace(new, out_dir)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def staged_dir(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``out_dir``; on success it replaces ``out_dir``, on any error it vanishes.

    Same filesystem as the target, so every move is a rename: a crash never leaves half an engine directory.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    recover(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Progress bars for the long commands (export parity, calibration, quantize calibration, bench).

Bars go to stderr and only when it is a terminal, so logs, pipes and tests stay clean; ``DEPLOYKIT_PROGRESS=1``
forces them on and ``=0`` off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def enabled(flag: bool | None = None) -> bool:
    """Whether to draw bars: an explicit ``flag``, else ``DEPLOYKIT_PROGRESS``, else whether stderr is a TTY."""
    if flag is not None:
        return flag
    env = os.environ.get("DEPLOYKIT_PROGRESS", "").strip().lower()
    if env in ("0", "1", "true", "false", "yes", "no"):
        return env in ("1", "true", "yes")
    return sys.stderr.isatty()


def bar(total: int | None = None, desc: str = "", show: bool | None = None, unit: str = "it") -> Any:
    """A tqdm bar on stderr (disabled when not :func:`enabled`); use as a context manager or call ``close()``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled(show), file=sys.stderr, leave=False,
                dynamic_ncols=True)


def track(items: Iterable[T], desc: str = "", total: int | None = None, show: bool | None = None) -> Iterator[T]:
    """Iterate ``items`` with a bar."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with bar(total, desc, show) as b:
        for item in items:
            yield item
            b.update(1)

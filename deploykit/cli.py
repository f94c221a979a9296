"""The ``deploykit`` command line: thin click commands, each calling one library function.

Library modules are imported inside each command, so ``deploykit --help`` is instant and needs no GPU, torch or
onnxruntime. A :class:`DeployKitError` becomes a one-line message and exit code 2 instead of a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any

import click

from deploykit import __version__
from deploykit.errors import DeployKitError


def _friendly_errors(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except DeployKitError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)

    return wrapper


def _csv(kind: Callable) -> Callable:
    def parse(ctx: Any, param: Any, value: str | None) -> list | None:
        if value is None:
            return None
        try:
            return [kind(v) for v in value.split(",") if v.strip()]
        except ValueError as e:
            raise click.BadParameter(f"expected comma-separated {kind.__name__} values, got {value!r}") from e

    return parse


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
@click.version_option(__version__, prog_name="deploykit")
def main() -> None:
    """Train, export and run early-exit / token-merging vision transformers cheaply."""


# ---- train ---------------------------------------------------------------------------------------------------
# (train command: see deploykit/train; added below)

# ---- export / calibrate / bench / predict ----------------------------------------------------------------------
# (added below)

"""Write docs/cli.md from the click command tree, so the CLI reference always matches the code.

Run ``python scripts/gen_cli_docs.py`` to rewrite docs/cli.md, or with ``--check`` to exit 1 when it is out of date
(the tests do that).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from deploykit.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"


def render() -> str:
    """The whole reference as Markdown: the group's help, then every command's."""
    ctx = click.Context(main, info_name="deploykit")
    lines = ["# CLI reference", "", "Generated from the code by `python scripts/gen_cli_docs.py`; do not edit by hand.",
             "Every command turns a deploykit error into a one-line `error: ...` message and exit code 2.", ""]
    lines += ["```", main.get_help(ctx).rstrip(), "```", ""]
    for name in main.list_commands(ctx):
        cmd = main.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx)
        lines += [f"## `deploykit {name}`", "", "```", cmd.get_help(sub).rstrip(), "```", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        if not DOC.exists() or DOC.read_text() != text:
            print("docs/cli.md is out of date: run python scripts/gen_cli_docs.py", file=sys.stderr)
            sys.exit(1)
    else:
        DOC.write_text(text)

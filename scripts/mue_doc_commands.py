"""The `deploykit ...` commands of docs/mue.md's code blocks, in pipeline order, for scripts/check-mue-docs.sh.

Extracting them from the doc (rather than copying them into the script) keeps the doc and its check from drifting
apart. The one change allowed is shortening training with ``--set train.steps=N``.

    python scripts/mue_doc_commands.py [--steps N] [--doc docs/mue.md]   # one shell line per command
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

DOC = Path(__file__).resolve().parent.parent / "docs" / "mue.md"
# a pipeline needs train before export before calibrate ...; the doc shows them in reading order instead
ORDER = ["train", "export", "calibrate", "predict", "quantize", "bench", "lint", "build"]
_FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def code_lines(text: str) -> list[str]:
    """Every logical line of every fenced block (backslash continuations joined)."""
    out: list[str] = []
    for block in _FENCE.findall(text):
        out.extend(line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip())
    return out


def argv_of(line: str) -> list[str] | None:
    """The `deploykit` argv of a shell line (env assignments and a trailing comment dropped), else None."""
    words = shlex.split(line, comments=True)
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
        words.pop(0)
    return words if words and words[0] == "deploykit" else None


def doc_commands(doc: Path = DOC) -> list[list[str]]:
    """The doc's distinct `deploykit` commands, verbatim, in pipeline order (reading order within a step)."""
    seen: list[list[str]] = []
    for line in code_lines(doc.read_text()):
        argv = argv_of(line)
        if argv and argv not in seen:
            seen.append(argv)
    # the INT8 copy's calibrate needs quantize first: commands naming an engine that a quantize makes come after it
    made = {a[a.index("-o") + 1] for a in seen if a[1] == "quantize" and "-o" in a}

    def rank(argv: list[str]) -> tuple[int, int]:
        if argv[1] == "calibrate" and argv[2] in made:
            return ORDER.index("quantize"), 1
        return (ORDER.index(argv[1]) if argv[1] in ORDER else len(ORDER)), 0

    return sorted(seen, key=rank)


def shortened(argv: list[str], steps: int | None) -> list[str]:
    """``argv`` with ``--set train.steps=N`` appended to a train command (the only change the check makes)."""
    return argv + ["--set", f"train.steps={steps}"] if steps and argv[1] == "train" else argv


def main() -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=None, help="shorten training to N steps")
    ap.add_argument("--doc", type=Path, default=DOC)
    args = ap.parse_args()
    for argv in doc_commands(args.doc):
        print(shlex.join(shortened(argv, args.steps)))


if __name__ == "__main__":
    main()

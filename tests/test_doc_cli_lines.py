"""Every ``deploykit`` command the README and docs/*.md show names a real command and real options.

Commands are taken from the fenced code blocks (continuation lines joined, ``&&`` / ``;`` / ``|`` chains split,
comments dropped) and checked against the click tree: the subcommand exists, every option is one of its options,
an option that takes a value gets one, a literal value of a choice option is one of its choices, and there are not
more positional arguments than the command takes. Running them is the job of the contract and CLI tests; this
catches a doc that drifted from the code (a renamed flag, a removed choice) the moment it happens.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import click
import pytest

from deploykit.cli import main

ROOT = Path(__file__).resolve().parents[1]
# docs/cli.md is generated from the click tree itself (tests/test_docs.py keeps it current)
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "cli.md")]
_FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)


def doc_commands(text: str) -> list[list[str]]:
    """The argv (after ``deploykit``) of each deploykit command in the text's code blocks."""
    found = []
    for block in _FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            for part in re.split(r"&&|;|\|", line):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:  # an unbalanced quote in prose-like text: not a command line
                    continue
                while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):  # VAR=value prefixes
                    words = words[1:]
                if words[:1] == ["$"]:
                    words = words[1:]
                if words[:1] == ["deploykit"] and len(words) > 1:
                    found.append(words[1:])
    return found


def check(argv: list[str]) -> None:
    """Raise AssertionError naming what in ``deploykit <argv>`` the CLI does not have."""
    name, rest = argv[0], argv[1:]
    cmd = main.commands.get(name)
    assert cmd is not None, f"no command {name!r}"
    options = {o: p for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}
    options.update({"--help": None, "-h": None})
    positional, i = [], 0
    while i < len(rest):
        word = rest[i]
        if word == "...":  # "the rest of your usual options"
            pass
        elif word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-\d.*", word):
            opt, eq, value = word.partition("=")
            assert opt in options, f"{name}: no option {opt}"
            p = options[opt]
            optional = getattr(p, "_flag_needs_value", False)  # --opt alone or --opt VALUE (flag_value)
            if p is not None and not p.is_flag and not eq and not (
                    optional and (i + 1 == len(rest) or rest[i + 1].startswith("-"))):
                assert i + 1 < len(rest), f"{name}: {opt} needs a value"
                i, value = i + 1, rest[i + 1]
            if p is not None and isinstance(p.type, click.Choice) and value and re.fullmatch(r"[\w.-]+", value):
                assert value in p.type.choices, f"{name}: {opt} {value!r} is not one of {list(p.type.choices)}"
        else:
            positional.append(word)
        i += 1
    args = [p for p in cmd.params if isinstance(p, click.Argument)]
    if not any(a.nargs == -1 for a in args):
        assert len(positional) <= len(args), f"{name}: {len(positional)} arguments {positional}, takes {len(args)}"


CASES = [(doc.name, argv) for doc in DOCS for argv in doc_commands(doc.read_text())]


def test_docs_show_commands():
    assert len(CASES) >= 40 and {argv[0] for _, argv in CASES} >= {"train", "export", "calibrate", "serve-local"}


@pytest.mark.parametrize(("doc", "argv"), CASES, ids=[f"{d}:{' '.join(a)[:60]}" for d, a in CASES])
def test_doc_command_matches_the_cli(doc, argv):
    check(argv)


@pytest.mark.parametrize(("argv", "why"), [
    (["serve-ray", "ENGINE", "--grpc"], "no option --grpc"),
    (["quantize", "ENGINE", "--mode", "fp8"], "is not one of"),
    (["calibrate", "ENGINE", "--max-drop"], "needs a value"),
    (["predict2", "ENGINE"], "no command"),
    (["info", "A", "B"], "takes 1"),
])
def test_the_check_catches_drift(argv, why):
    with pytest.raises(AssertionError, match=why):
        check(argv)

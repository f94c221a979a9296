"""docs/mue.md's commands, as scripts/check-mue-docs.sh extracts them, exist in the CLI (fast; no training).

The slow end-to-end run of the same commands is scripts/check-mue-docs.sh.
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import click

from deploykit.cli import main

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("mue_doc_commands", ROOT / "scripts" / "mue_doc_commands.py")
mdc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mdc)


def test_extraction_finds_the_pipeline_in_order():
    cmds = mdc.doc_commands()
    subs = [a[1] for a in cmds]
    assert subs[:2] == ["train", "export"]
    for sub in ("calibrate", "predict", "quantize", "bench", "lint", "build"):
        assert sub in subs, sub
    # the INT8 copy is calibrated after quantize made it, and before bench --compare uses it
    q = subs.index("quantize")
    assert cmds[q + 1][:3] == ["deploykit", "calibrate", "engines/mue-synthetic-int8"]
    assert subs.index("bench") > q + 1
    bench = cmds[subs.index("bench")]
    assert "--compare" in bench and "--checkpoint" in bench
    # env prefixes and trailing comments are not part of a command; quoted text stays one word
    assert all(not w.startswith("#") for a in cmds for w in a)
    assert ["--text", "there is a red circle"] in [a[i:i + 2] for a in cmds for i in range(len(a))]
    assert len(cmds) == len({tuple(a) for a in cmds}), "duplicates are run once"


def test_only_training_is_shortened():
    cmds = mdc.doc_commands()
    short = [mdc.shortened(a, 150) for a in cmds]
    for a, s in zip(cmds, short):
        assert s == (a + ["--set", "train.steps=150"] if a[1] == "train" else a)


def _opts(cmd: click.Command) -> set[str]:
    return {o for p in cmd.params if isinstance(p, click.Option) for o in (*p.opts, *p.secondary_opts)}


def test_every_doc_command_and_option_exists_in_the_cli():
    for argv in mdc.doc_commands():
        cmd = main.commands.get(argv[1])
        assert cmd is not None, f"docs/mue.md uses `deploykit {argv[1]}`, which the CLI lacks"
        opts = _opts(cmd)
        flags = [w.split("=", 1)[0] for w in argv[2:] if w.startswith("-")]
        for f in flags:
            assert f in opts, f"`deploykit {argv[1]}` has no option {f} (docs/mue.md: {' '.join(argv)})"
        # the positional words fit the command's arguments (parsed only: no type checks, nothing runs)
        parsed, extra, _ = cmd.make_parser(click.Context(cmd, info_name=argv[1])).parse_args(argv[2:])
        assert not extra, f"extra words {extra} in {' '.join(argv)}"
        for p in cmd.params:
            if isinstance(p, click.Argument) and p.required:
                assert parsed.get(p.name), f"{' '.join(argv)} lacks the argument {p.name}"

def test_helper_prints_shell_lines():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "mue_doc_commands.py"), "--steps", "7"],
                       capture_output=True, text=True, check=True)
    lines = r.stdout.splitlines()
    assert lines[0].startswith("deploykit train ") and lines[0].endswith("--set train.steps=7")
    assert "--text 'there is a red circle'" in r.stdout

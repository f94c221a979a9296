"""One dispatch point: no module outside deploykit/families tests method or manifest-task names.

How it is checked: every ``deploykit/**/*.py`` is scanned (comments and docstrings included, so a mention in prose
must be rephrased) for comparisons against ``mue`` or a manifest task (classification, vl, vl-entailment,
vl-caption), ``startswith("vl")``, ``"mue" in ...``, and comparisons of a method's name (``method.name == ...``,
``method["name"] != ...``). PYRA's ``exits: dmpo`` setting (which exit heads PYRA uses) is a method setting, not a
family choice, and is not matched; nor are the VL *task* names of a MuE engine (``entailment`` / ``caption``, what
to generate), which are data, not a family choice. Allowed: ``deploykit/kinds.py`` (the one table of methods and
tasks per family), ``deploykit/families/`` (the registry built on it) and ``deploykit/methods/mue/`` (MuE checking
its own recipe).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "deploykit"
NAMES = r"(?:mue|classification|vl|vl-entailment|vl-caption)"  # a family's method or task, compared anywhere
PATTERNS = [
    re.compile(r"""\.startswith\(\s*["']vl"""),
    re.compile(rf"""(?:==|!=)\s*["']{NAMES}["']"""),
    re.compile(rf"""["']{NAMES}["']\s*(?:==|!=|in\b|not\s+in\b)"""),
    re.compile(r"""(?:method(?:\.get\(["']name["']\)|\[["']name["']\]|\.name))\s*(?:==|!=)"""),
]
ALLOWED = ("families/", "methods/mue/", "kinds.py")


def _hits() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(ALLOWED):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(p.search(line) for p in PATTERNS):
                out.setdefault(rel, []).append(f"{rel}:{n}: {line.strip()}")
    return out


def test_no_method_or_task_string_tests_outside_the_family_registry():
    hits = _hits()
    assert not hits, "decide the family once (deploykit.families), not here:\n" + "\n".join(
        line for v in hits.values() for line in v)


def test_the_scan_finds_what_it_looks_for(tmp_path):
    """The patterns catch the forms issue 13 found (so a pass above means something)."""
    bad = ['if manifest.task.startswith("vl"):', 'if cfg["method"]["name"] == "mue":', 'if "mue" in m.extra:',
           'if m.task != "classification":', 'if method.name == "dmpo":']
    for line in bad:
        assert any(p.search(line) for p in PATTERNS), line
    ok = ['if task == "entailment":', 'family_for_manifest(m).predict(m, images)']
    for line in ok:
        assert not any(p.search(line) for p in PATTERNS), line

"""The README and docs/ say only what is true of this code: every `bnff` command and option they name
exists (and every option of a benchmark script they name), every relative link points at a file,
the README stays a front page (at most 300 lines), and its quickstart prints what it says it prints."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bnff.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
CURRENT = [p for p in PAGES if p.name != "CHANGELOG.md"]  # the changelog may name options since renamed

# A paragraph (or list item) is read left to right: an option belongs to the command or script named last before it;
# other programs (torchrun, pytest, pip, make, python -X ...) take their own options, which are not ours.
_TOKEN = re.compile(r"(?P<cmd>\bbnff (?:train|bench|plan|traffic|simulate|tile)\b)"
                    r"|(?P<script>benchmarks/[a-z_0-9]+\.py)"
                    r"|(?P<other>\btorchrun\b|\bpytest\b|\bpip\b|\bmake\b|\bpython3? -[Xc]|\blscpu\b|\bgit\b|\bpy-spy\b)"
                    r"|(?P<opt>(?<![\w-])--[a-z][a-z0-9-]*)")


def _bnff_options() -> dict[str, set[str]]:
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.choices.items()}


def _script_options(path: Path) -> set[str]:
    """The options a benchmark script's argparse declares, read from its source (no import, no torch)."""
    found = {"--help"}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            found |= {a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")}
    return found


def _named_options(text: str):
    """(owner, option) for every option in ``text``: owner is "bnff CMD", a script path or None."""
    for para in re.split(r"\n\s*\n|\n(?=[*-] )", text):  # paragraphs and list items
        owner = None
        for m in _TOKEN.finditer(para):
            if m.group("cmd") or m.group("script"):
                owner = m.group("cmd") or m.group("script")
            elif m.group("other"):
                owner = None
            elif owner is not None:
                yield owner, m.group("opt")


def test_every_command_and_option_named_exists():
    options = _bnff_options()
    bad, checked = [], 0
    for page in CURRENT:
        for owner, opt in _named_options(page.read_text()):
            if owner.startswith("bnff "):
                known = options[owner.split()[1]]
            else:
                script = ROOT / owner
                if not script.exists():
                    bad.append(f"{page.name}: {owner} does not exist")
                    continue
                known = _script_options(script)
            checked += 1
            if opt not in known:
                bad.append(f"{page.name}: {owner} has no option {opt}")
    assert not bad, "\n".join(sorted(set(bad)))
    assert checked > 100, checked  # the reader found the options (a broken regex would find none)


def test_relative_links_point_at_files():
    bad = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#", "mailto:")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                bad.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not bad, "\n".join(bad)


def test_readme_is_a_front_page():
    text = (ROOT / "README.md").read_text()
    lines = text.splitlines()
    assert len(lines) <= 300, len(lines)
    assert lines[3:5] == ["make demo    # creates .venv, installs bnff and torch==2.13.0 (CPU), trains ResNet-18 on digits: eager vs bnff",
                          "make test    # the test suite, then its exactness tests again with every kernel held to AVX2"]
    for section in ("## Requirements", "## Install", "## Quickstart", "## Commands", "## Limitations",
                    "## References", "## Glossary"):
        assert section in text, section
    for paper in ("Restructuring Batch Normalization to Accelerate CNN Training", "doi:10.19665/j.issn1001-2400.2020.02.014",
                  "inter-layer fusion", "Pointwise Convolutional"):
        assert paper in " ".join(text.split()), paper


def test_quickstart_prints_what_the_readme_says():
    from bnff.ops.backends import cpu

    if not cpu.available():
        pytest.skip("the printed output names the cpu backend, whose kernels did not build here")
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    printed = re.search(r"prints[^\n]*\n\n```\n(.*?)```", section, re.S).group(1)
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout == printed, f"the quickstart printed:\n{run.stdout}"

"""The documentation site: ``mkdocs build --strict`` passes (every page in the nav, every link
and anchor resolves, every API page renders from the docstrings without warnings), the code on
the guide pages runs, and the command-line page lists every ``deqdiff`` command."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import deqdiff
from deqdiff.solvers.base import _REGISTRY

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: pages whose ```python blocks run, each page as one script (later blocks use earlier names)
RUNNABLE_PAGES = ("index.md", "getting-started.md", "concepts.md")
#: API objects whose reference entries must be in the built site: (page, anchor id)
API_ANCHORS = [
    ("reference/deqdiff", "deqdiff.engine.fixed_point.fixed_point"),
    ("reference/deqdiff", "deqdiff.engine.linear_solve.linear_solve"),
    ("reference/deqdiff", "deqdiff.DEQ"),
    ("reference/deqdiff", "deqdiff.WarmStart"),
    ("reference/deqdiff", "deqdiff.register_solver"),
    ("reference/deqdiff", "deqdiff.FixedPointInfo"),
    ("reference/deqdiff", "deqdiff.SingularOperatorError"),
    ("reference/solvers", "deqdiff.solvers.anderson.anderson"),
    ("reference/derivatives", "deqdiff.derivatives.LossHessian"),
    ("reference/derivatives", "deqdiff.derivatives.lanczos.lanczos"),
    ("reference/layers", "deqdiff.layers.DEQ"),
    ("reference/models", "deqdiff.models.MDEQ"),
    ("reference/physics", "deqdiff.physics.pde.PDEProblem"),
    ("reference/physics", "deqdiff.physics.pde_runner.train_pde"),
    ("reference/training", "deqdiff.training.train"),
    ("reference/analysis", "deqdiff.analysis.empirical_ntk"),
]


def _missing_toolchain() -> str | None:
    for module, package in (("mkdocs", "mkdocs"), ("material", "mkdocs-material"),
                            ("mkdocstrings", "mkdocstrings"), ("mkdocstrings_handlers.python", "mkdocstrings-python")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return package
    return None


def test_site_builds_in_strict_mode(tmp_path):
    missing = _missing_toolchain()
    if missing:
        pytest.skip(f"{missing} is not installed (pip install -e '.[test]' installs the docs toolchain)")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(site)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    for page, anchor in API_ANCHORS:
        html = (site / page / "index.html").read_text(encoding="utf-8")
        assert f'id="{anchor}"' in html, f"{anchor} is not rendered on {page}"
    for page in site.rglob("*.html"):  # docs/_hooks/render_fixes.py: Sphinx roles, escaped pipes in table cells
        html = page.read_text(encoding="utf-8")
        assert not re.search(r":(func|mod|class|meth|attr|data|exc|obj):<code>", html), page
        assert not any("\\|" in cell for cell in re.findall(r"<td>.*?</td>", html, flags=re.S)), page


def _python_blocks(page: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(encoding="utf-8"), flags=re.S | re.M)


@pytest.mark.parametrize("page", RUNNABLE_PAGES)
def test_code_on_the_guide_pages_runs(page, capsys):
    """Each page's ```python blocks, in order, as one script: in the default dtype a user has
    (float32), with a ConvergenceWarning an error (the examples are meant to converge)."""
    blocks = _python_blocks(page)
    assert blocks, f"{page} has no python example"
    namespace = {"__name__": f"docs_{page}"}
    dtype = torch.get_default_dtype()
    registry = {kind: dict(solvers) for kind, solvers in _REGISTRY.items()}  # a page may register a solver
    torch.set_default_dtype(torch.float32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", deqdiff.ConvergenceWarning)
            for i, block in enumerate(blocks):
                exec(compile(block, f"docs/{page} (python block {i + 1})", "exec"), namespace)
    finally:
        torch.set_default_dtype(dtype)
        for kind, solvers in registry.items():
            _REGISTRY[kind].clear()
            _REGISTRY[kind].update(solvers)


def _commands(parser: argparse.ArgumentParser, prefix: str) -> list[str]:
    """Every leaf command: sub-parsers, and a positional with choices (``inverse deblur|denoise``)."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subs:
        return [c for s in subs for name, sub in s.choices.items() for c in _commands(sub, f"{prefix} {name}")]
    tasks = [a for a in parser._actions if not a.option_strings and a.choices]
    return [f"{prefix} {choice}" for a in tasks for choice in a.choices] or [prefix]


def test_cli_page_lists_every_command():
    from deqdiff.cli import build_parser

    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    commands = _commands(build_parser(), "deqdiff")
    assert len(commands) >= 10
    for command in commands:
        assert re.search(rf"^#+ `{re.escape(command)}`$", text, flags=re.M), f"docs/cli.md has no section for {command}"
        assert f"| `{command}` |" in text, f"docs/cli.md's table has no row for {command}"

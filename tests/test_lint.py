"""The lint configuration of ``pyproject.toml`` ([tool.ruff]) holds for the whole repository."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    ruff = shutil.which("ruff")
    cmd = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    try:
        proc = subprocess.run([*cmd, "check", "--output-format", "concise", "."], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    if "No module named ruff" in proc.stderr:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""The tree passes ruff's lint and is ruff-formatted (configuration in pyproject.toml)."""

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _ruff(*args: str) -> subprocess.CompletedProcess:
    ruff = shutil.which("ruff")
    assert ruff, "ruff is not installed: `pip install -e '.[dev]'` (scripts/setup.sh does it)"
    return subprocess.run([ruff, *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint():
    p = _ruff("check", ".")
    assert p.returncode == 0, p.stdout + p.stderr


def test_ruff_format():
    p = _ruff("format", "--check", ".")
    assert p.returncode == 0, p.stdout + p.stderr

"""What `make lint` checks, in the suite CI runs: ruff's rules, ruff's formatting, and the types of the
contract modules (`[tool.mypy]` in pyproject.toml). The import contracts are tests/test_isolation.py."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
FOLDERS = ["appliance", "builder", "tui", "tests", "bench"]


@pytest.mark.parametrize(
    "command",
    [["ruff", "check", *FOLDERS], ["ruff", "format", "--check", *FOLDERS], ["mypy"]],
    ids=["ruff-check", "ruff-format", "mypy"],
)
def test_lint(command):
    proc = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]

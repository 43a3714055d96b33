"""The package's layers, checked by the import-linter contracts in pyproject.toml."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def _lint_imports() -> str:
    # The script installed beside this interpreter, so it analyses the same environment.
    beside = Path(sys.executable).with_name("lint-imports")
    return str(beside) if beside.is_file() else (shutil.which("lint-imports") or "lint-imports")


def test_import_contracts_are_kept():
    # lint-imports reads [tool.importlinter] from pyproject.toml in its working directory and
    # analyses the autofinetune package found on sys.path (PYTHONPATH is passed on).
    result = subprocess.run(
        [_lint_imports(), "--no-cache"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"lint-imports found broken contracts:\n{result.stdout}{result.stderr}"

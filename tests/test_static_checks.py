"""Static checks of the package: types (mypy), unused code (ruff, vulture).

Each tool reads its settings from pyproject.toml ([tool.mypy], [tool.ruff], [tool.vulture]),
where the strictness is stated.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO_ROOT


def _tool(name: str) -> str:
    # The script installed beside this interpreter, so it checks the same environment.
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.is_file() else (shutil.which(name) or name)


def _run(args: list[str], *, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


def test_mypy_passes_on_the_package():
    result = _run([_tool("mypy"), "autofinetune"])
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"


def test_a_users_type_checker_sees_the_real_signatures_of_the_lazy_names(tmp_path):
    """``autofinetune.launch`` and friends load on first use; mypy must still see their types."""
    (tmp_path / "user_code.py").write_text(
        "import autofinetune\n"
        "spec = autofinetune.load_spec('studies/digits-demo.toml')\n"
        "study = autofinetune.launch(spec, n_trials=3)\n"
        "reveal_type(study)\n"
        "autofinetune.launch(spec, n_trials='three')\n"
        "autofinetune.run_trial(spec, {}, 'not images')\n"
        "autofinetune.objective(spec, callbacks=[])\n"
    )
    # The package found as the user's code finds it; errors inside it are the other test's.
    env = {**os.environ, "MYPYPATH": str(REPO_ROOT)}
    result = _run(
        [_tool("mypy"), "--follow-imports=silent", "--no-incremental", "user_code.py"], cwd=tmp_path, env=env
    )
    out = result.stdout
    assert re.search(r'user_code.py:4: note: Revealed type is "optuna\.study\.study\.Study"', out), out
    assert re.search(r'user_code.py:5: error: Argument "n_trials" to "launch" has incompatible type "str"', out), out
    assert re.search(r'user_code.py:6: error: Argument 3 to "run_trial" has incompatible type "str"', out), out
    assert "user_code.py:3:" not in out and "user_code.py:7:" not in out, out


def test_ruff_finds_no_unused_import_variable_or_undefined_name():
    result = _run([_tool("ruff"), "check", "autofinetune", "tests", "benchmarks"])
    assert result.returncode == 0, f"ruff:\n{result.stdout}{result.stderr}"


#: What vulture reports that this check fails on; its guesses about attributes and variables
#: (dataclass and pydantic fields read by name, hook arguments) are not checked.
DEAD_CODE = re.compile(r"unused (function|method|class|property|import)|unreachable code")


def test_vulture_finds_no_dead_function_class_or_import():
    # Tests count as callers; the package and the benchmarks are what must have none.
    result = _run([_tool("vulture")])
    dead = [
        line for line in result.stdout.splitlines()
        if line.startswith(("autofinetune/", "benchmarks/")) and DEAD_CODE.search(line)
    ]
    assert result.returncode in (0, 3), result.stderr  # 3: vulture found something (filtered above)
    assert not dead, "dead code (or a framework hook missing from [tool.vulture] ignore_names):\n" + "\n".join(dead)

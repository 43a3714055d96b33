"""The study-database scale benchmark runs the real worker loop and loses nothing (small N)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO_ROOT, cli_env


@pytest.mark.slow
def test_scale_benchmark_with_four_simulated_workers_loses_nothing():
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "study_db_scale.py"), "--quick", "--n", "4",
         "--epoch-seconds", "0.5"],
        env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    row = next(line.split() for line in lines if line.split()[:2] == ["4", "sqlite"])
    assert int(row[3]) >= 8, "4 workers x 2 trials finished"
    assert "heavy modules" not in out.stdout, "TensorFlow or Keras was imported by a simulated worker"
    assert lines[-1] == "lost 0, duplicated 0, stuck 0"


@pytest.mark.slow
def test_simulated_workers_on_postgresql_start_no_trial_beyond_the_budget():
    from postgres import postgres_available

    if not postgres_available():
        pytest.skip("PostgreSQL is not installed")
    out = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "study_db_scale.py"), "--n", "12", "--databases", "postgresql",
         "--epoch-seconds", "0.3", "--max-connections", "100"],
        env=cli_env(), capture_output=True, text=True, timeout=600,
    )
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    header = next(line.split() for line in lines if line.split()[:2] == ["N", "database"])
    row = dict(zip(header, next(line.split() for line in lines if line.split()[:2] == ["12", "postgresql"])))
    assert int(row["trials"]) == 24, "12 workers x 2 trials, exactly the budget"
    assert row["over"] == "0", "workers claiming at the same moment started trials beyond the budget"
    assert int(row["conns"]) <= 3 * 12, "each worker holds its own storage's connections only"
    assert lines[-1] == "lost 0, duplicated 0, stuck 0"

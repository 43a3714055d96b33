"""`autofinetune report`: one static HTML page that works without a server."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys

import optuna
import pytest

from autofinetune.viewing.html_report import render_report

from conftest import cli_env


def test_report_is_one_self_contained_page_of_the_study(launched_study, tmp_path):
    out = tmp_path / "report.html"
    done = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "report", launched_study.name, "--storage", launched_study.url,
         "--out", str(out)],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Warning" not in done.stdout + done.stderr, done.stderr
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~mask, "readable by others, as the umask allows"
    page = out.read_text(encoding="utf-8")
    # plotly.js is inlined: no script comes from elsewhere.
    assert not re.search(r"<script[^>]+src=", page)
    assert "Plotly.newPlot" in page and len(page) > 3_000_000
    for title in ("Best trial:", "Optimization history", "Intermediate values", "Parallel coordinates",
                  "Parameter importances", "Trials", "Spec", "phase boundary"):
        assert title in page, title
    assert page.count('<div class="figure">') == 5  # best trial's curve + four study plots
    assert len(re.findall(r'<tr class="COMPLETE">', page)) == 3
    assert "baseline (seed recipe)" in page


def test_report_explains_plots_that_need_more_trials(tmp_path):
    pytest.importorskip("plotly")
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'one.db'}", study_name="one", direction="maximize")
    study.enqueue_trial({"x": 0.5})
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=1)
    page = render_report(study)
    assert "Not available: needs at least 2 completed trials; this study has 1" in page
    assert "Not available: no trial reported an epoch yet" in page
    assert page.count('<div class="figure">') == 2  # optimization history and parallel coordinates


def test_report_into_a_missing_folder_exits_2(launched_study, tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "report", launched_study.name, "--storage", launched_study.url,
         "--out", str(tmp_path / "no" / "such" / "report.html")],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 2 and "--out: cannot write" in done.stderr

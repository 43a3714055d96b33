"""The study in optuna-dashboard: notes and learning curves, the server, its API and the page."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from autofinetune.spec import parse_spec
from autofinetune.trial.results import EpochRecord, PhaseSummary, TrialResult
from autofinetune.store.artifacts import open_artifact_store
from autofinetune.store.database import open_storage
from autofinetune.store.study import create_or_resume_study, spec_from_study
from autofinetune.viewing.trial_views import write_study_note

from conftest import cli_env, tiny_spec_dict

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]


def _note(study, trial_id: int | None = None) -> str:
    import optuna_dashboard

    from autofinetune.viewing.dashboard import read_trial_note

    return optuna_dashboard.get_note(study) if trial_id is None else read_trial_note(study, trial_id)


def _result(state: str, *, pruned_at: int | None = None, error: str | None = None) -> TrialResult:
    history = (
        EpochRecord(1, 1, {"loss": 1.0, "accuracy": 0.4, "val_loss": 1.1, "val_accuracy": 0.5}),
        EpochRecord(2, 2, {"loss": 0.8, "accuracy": 0.6, "val_loss": 1.0, "val_accuracy": 0.25}),
    )
    return TrialResult(
        params={"head_units": 8}, objective="val_accuracy", direction="maximize", history=history,
        best_value=0.5, best_step=1, unfrozen_blocks=("conv5_block3",),
        phases=(PhaseSummary(1, 1, 0.5, 100, 1.0, 40.0), PhaseSummary(2, 1, 0.25, 300, 2.0, 20.0)),
        state=state, pruned_at_step=pruned_at, error=error,
    )


NOTES_SPEC = tiny_spec_dict(name="notes", search={"pruner": "median"}, schedule={"phase1_epochs": 1, "phase2_epochs": 1})


def _record(study, store, trial, result: TrialResult | None = None, *, reason: str | None = None) -> list[str]:
    """What the one trial path writes for a trial that ended: its attributes, then its views.

    Returns:
        The views' warnings.
    """
    from autofinetune.store.trial_writer import TrialWriter, result_attributes
    from autofinetune.viewing.notes import RESULT_STATES
    from autofinetune.viewing.trial_views import write_trial_views

    attrs = result_attributes(result, phase1_epochs=1) if result is not None else {}
    if reason is not None:
        attrs["fail_reason"] = reason
    TrialWriter(study, spec_from_study(study)).write_attributes(trial._trial_id, attrs)
    state = RESULT_STATES[result.state] if result is not None else "FAIL"
    value = result.best_value if result is not None and result.state == "complete" else None
    return write_trial_views(study, trial._trial_id, state=state, value=value, attrs=attrs, artifact_store=store)


@pytest.fixture
def fresh_study(tmp_path):
    """A created study (spec note written) and its artifact store; no Keras involved."""
    url = f"sqlite:///{tmp_path / 'notes.db'}"
    spec = parse_spec(NOTES_SPEC, base_dir=tmp_path)
    study, _ = create_or_resume_study(spec, open_storage(url))
    write_study_note(study)  # as launch does
    return study, open_artifact_store(str(tmp_path / "artifacts"))


# --- notes, written by the engines' hooks ------------------------------------------------------


def test_study_note_holds_the_spec_and_is_kept_on_resume(fresh_study, tmp_path):
    study, _ = fresh_study
    note = _note(study)
    assert note.startswith("## notes") and "pruner `median`" in note and '"tiny_resnet"' in note
    assert study.metric_names == ["val_accuracy"]
    import optuna_dashboard

    optuna_dashboard.save_note(study, "edited by a person")
    spec = parse_spec(NOTES_SPEC, base_dir=tmp_path)
    create_or_resume_study(spec, study._storage)
    write_study_note(study)
    assert _note(study) == "edited by a person"


def test_pruned_trial_gets_a_note_and_a_learning_curve(fresh_study):
    study, store = fresh_study
    trial = study.ask()
    _record(study, store, trial, _result("pruned", pruned_at=2))
    study.tell(trial, state=TrialState.PRUNED)

    note = _note(study, trial._trial_id)
    assert note.startswith(f"### Trial {trial.number}: PRUNED")
    assert "**Pruned** after step 2 by the `median` pruner" in note and "during phase 2" in note
    assert "phase boundary**: after step 1" in note and "`conv5_block3`" in note
    assert "| images/s | 40 | 20 |" in note and "| best val_accuracy | 0.5 | 0.25 |" in note
    (meta,) = optuna.artifacts.get_all_artifact_meta(study.trials[0], storage=study._storage)
    assert meta.filename == "learning_curve.svg" and meta.mimetype == "image/svg+xml"
    assert f"/artifacts/{study._study_id}/{trial._trial_id}/{meta.artifact_id}" in note
    svg = store.open_reader(meta.artifact_id).read().decode()
    assert "<svg" in svg and "phase 1" in svg and "phase 2" in svg and "pruned" in svg


def test_failed_trials_get_notes_whether_they_return_or_raise(fresh_study):
    study, store = fresh_study
    returned = study.ask()
    _record(study, store, returned, _result("failed", error="training loss became nan at step 2 (phase 2)"))
    study.tell(returned, state=TrialState.FAIL)
    raised = study.ask()
    _record(study, store, raised, reason="ResourceExhaustedError: out of memory")
    study.tell(raised, state=TrialState.FAIL)

    assert "**Failed**: training loss became nan at step 2 (phase 2)" in _note(study, returned._trial_id)
    note = _note(study, raised._trial_id)
    assert note.startswith(f"### Trial {raised.number}: FAIL") and "out of memory" in note
    assert study.trials[raised.number].user_attrs["fail_reason"] == "ResourceExhaustedError: out of memory"


def test_a_failing_note_or_curve_is_a_warning_never_an_error(fresh_study, monkeypatch):
    import optuna_dashboard

    def broken(*args, **kwargs):
        raise RuntimeError("dashboard storage hiccup")

    study, store = fresh_study
    monkeypatch.setattr(optuna_dashboard, "save_note", broken)
    monkeypatch.setattr(optuna.artifacts, "upload_artifact", broken)
    trial = study.ask()
    warnings = _record(study, store, trial, _result("complete"))
    assert warnings == [
        "learning curve not uploaded: RuntimeError: dashboard storage hiccup",
        "dashboard note not written: RuntimeError: dashboard storage hiccup",
    ]
    study.tell(trial, 0.5)
    assert study.trials[0].state == TrialState.COMPLETE
    assert study.trials[0].user_attrs["phase1_best"] == 0.5


def test_trials_of_workers_without_optuna_dashboard_get_their_notes_when_the_dashboard_starts(
    fresh_study, monkeypatch
):
    from autofinetune.viewing.dashboard import backfill_notes

    study, store = fresh_study
    trial = study.ask()
    with monkeypatch.context() as patched:
        patched.setitem(sys.modules, "optuna_dashboard", None)  # a worker without the extra
        _record(study, store, trial, _result("complete"))
    study.tell(trial, 0.5)
    assert _note(study, trial._trial_id) == ""
    assert optuna.artifacts.get_all_artifact_meta(study.trials[0], storage=study._storage)  # the curve needs no extra

    assert backfill_notes(study) == 1
    note = _note(study, trial._trial_id)
    assert note.startswith(f"### Trial {trial.number}: COMPLETE, val_accuracy 0.5 at step 1")
    assert f"/artifacts/{study._study_id}/{trial._trial_id}/" in note  # found the uploaded curve
    assert backfill_notes(study) == 0


def test_missing_optuna_dashboard_names_the_extra(monkeypatch):
    from autofinetune.viewing.dashboard import require_optuna_dashboard
    from autofinetune.errors import ConfigError

    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=re.escape("pip install 'autofinetune[dashboard]'")):
        require_optuna_dashboard()


@pytest.mark.parametrize("config, expected", [
    ("[optuna_dashboard]\nport = \"eighty\"\n", "optuna_dashboard.port: got 'eighty'; expected a int"),
    ("[optuna_dashboard]\nserver = \"gunicorn\"\n", "optuna_dashboard.server: got 'gunicorn'; allowed here"),
    ("[optuna_dashboard]\ncolour = \"blue\"\n", "optuna_dashboard.colour: unknown key; allowed: host, port"),
])
def test_bad_dashboard_config_exits_2_naming_field_value_and_rule(tmp_path, config, expected):
    path = tmp_path / "dashboard.toml"
    path.write_text(config)
    out = subprocess.run(
        [sys.executable, "-m", "autofinetune.cli", "dashboard", "--config", str(path),
         "--storage", f"sqlite:///{tmp_path / 'none.db'}"],
        cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert expected in out.stderr


def test_default_config_file_is_optuna_dashboards_format():
    from optuna_dashboard._config import load_config_from_toml

    from autofinetune.viewing.dashboard import default_config_path, load_dashboard_config

    path = default_config_path()
    assert path is not None and path.parent.name == "dashboards"
    settings = load_dashboard_config(path)
    assert settings.host == "127.0.0.1" and settings.port == 8080
    # optuna-dashboard's own reader takes the same file.
    assert load_config_from_toml(str(path))["optuna_dashboard"]["host"] == "127.0.0.1"


# --- the real server on a launched study -------------------------------------------------------


class DashboardProcess:
    """`autofinetune dashboard` in a subprocess; its announced URL."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "autofinetune.cli", "dashboard", *args, "--port", "0"],
            cwd=cwd, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        found: queue.Queue[str] = queue.Queue()

        def read() -> None:
            for line in self.process.stdout:
                self.lines.append(line)
                match = re.search(r"optuna-dashboard: (http://\S+)", line)
                if match:
                    found.put(match.group(1))

        threading.Thread(target=read, daemon=True).start()
        try:
            self.url = found.get(timeout=120)
        except queue.Empty:
            self.stop()
            raise AssertionError("the dashboard announced no URL:\n" + "".join(self.lines)) from None
        self.root = self.url.split("/dashboard")[0]

    def get_json(self, path: str):
        with urllib.request.urlopen(self.root + path, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def served(launched_study):
    server = DashboardProcess(launched_study.name, "--storage", launched_study.url, cwd=launched_study.folder)
    yield server
    server.stop()


def test_dashboard_binds_loopback_and_announces_the_study_page(served, launched_study):
    study = launched_study.load()
    assert re.fullmatch(rf"http://127\.0\.0\.1:\d+/dashboard/studies/{study._study_id}", served.url)
    assert served.process.poll() is None


def test_dashboard_api_lists_the_study_its_trials_and_intermediate_values(served, launched_study):
    study = launched_study.load()
    summaries = served.get_json("/api/studies")["study_summaries"]
    (summary,) = [s for s in summaries if s["study_name"] == launched_study.name]
    assert summary["study_id"] == study._study_id

    detail = served.get_json(f"/api/studies/{study._study_id}")
    trials = study.get_trials()
    assert len(detail["trials"]) == len(trials) == 3
    for served_trial, trial in zip(detail["trials"], trials):
        assert served_trial["number"] == trial.number
        served_values = {v["step"]: v["value"] for v in served_trial["intermediate_values"]}
        assert served_values == trial.intermediate_values and sorted(served_values) == [1, 2]
        assert served_trial["note"]["body"].startswith(f"### Trial {trial.number}: COMPLETE")
        names = sorted(a["filename"] for a in served_trial["artifacts"])
        assert "learning_curve.svg" in names
    best = detail["best_trials"][0]
    assert best["number"] == study.best_trial.number
    assert {a["filename"] for a in best["artifacts"]} == {"learning_curve.svg", "model.keras"}
    assert "pruner `none`" in detail["note"]["body"]


def test_dashboard_serves_the_checkpoint_and_curve_artifacts(served, launched_study):
    study = launched_study.load()
    best = study.best_trial
    meta = {m.filename: m for m in optuna.artifacts.get_all_artifact_meta(best, storage=study._storage)}
    for filename, kind in (("model.keras", "application/octet-stream"), ("learning_curve.svg", "image/svg+xml")):
        url = f"{served.root}/artifacts/{study._study_id}/{best._trial_id}/{meta[filename].artifact_id}"
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
            assert response.headers["Content-Type"] == kind
        assert body == (launched_study.artifacts / meta[filename].artifact_id).read_bytes()


def test_dashboard_page_in_headless_chromium(served, launched_study, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    study = launched_study.load()
    best = study.best_trial
    with playwright.sync_playwright() as driver, tempfile.TemporaryDirectory() as profile:
        # A fresh profile each run; Playwright drives the system's Chromium and downloads nothing.
        context = driver.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            page = context.new_page()
            page.goto(served.url)
            page.get_by_text("Intermediate values").first.wait_for(timeout=60_000)
            page.get_by_text(f"{launched_study.name} (id={study._study_id})").first.wait_for()
            page.locator(".js-plotly-plot").first.wait_for()  # the plots drew
            page.screenshot(path=tmp_path / "study.png", full_page=True)

            page.goto(f"{served.url}/trials?numbers={best.number}")
            page.get_by_text(f"Trial {best.number}: COMPLETE").first.wait_for(timeout=60_000)
            for number in range(3):
                assert page.get_by_text(f"Trial {number}", exact=True).count() >= 1
            assert page.get_by_text("phase boundary").count() >= 1
            curve = page.locator(f'img[alt="learning curve of trial {best.number}"]')
            curve.wait_for()
            curve.scroll_into_view_if_needed()
            page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=curve.element_handle())
            assert curve.evaluate("img => img.naturalWidth") == 640
            page.screenshot(path=tmp_path / "trial.png")

            page.goto(f"{served.url}/note")
            page.get_by_text("Two-phase fine-tuning of").first.wait_for(timeout=60_000)
            page.screenshot(path=tmp_path / "note.png")
        finally:
            context.close()
    for name in ("study.png", "trial.png", "note.png"):
        assert (tmp_path / name).stat().st_size > 10_000

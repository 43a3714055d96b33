"""The Python API in a notebook: docs/python_api.ipynb runs in a real Jupyter kernel (nbclient)."""

from __future__ import annotations

import json

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO_ROOT

NOTEBOOK = REPO_ROOT / "docs" / "python_api.ipynb"
#: What the command line keeps out of its output, and a notebook's cells should show as little of.
LIBRARY_NOISE = ("cuInit", "oneDNN", "retracing", "absl::InitializeLog", "cpu_feature_guard", "Traceback")


@pytest.mark.slow
def test_the_python_api_notebook_runs_with_a_progress_widget_and_without_library_noise(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    launched, frame, resumed, own = code

    # launch() shows a bar of the study's trials: a tqdm.auto widget, in a notebook.
    widgets = [output for output in launched.outputs if "application/vnd.jupyter.widget-view+json" in output.get("data", {})]
    assert widgets, [output.get("output_type") for output in launched.outputs]
    assert "head_units" in launched.outputs[-1]["data"]["text/plain"]  # (best params, best value)
    assert "value_val_accuracy" in frame.outputs[-1]["data"]["text/html"]
    assert resumed.outputs[-1]["data"]["text/plain"] == "5"
    assert own.outputs[-1]["data"]["text/plain"].count("COMPLETE") == 2

    streams = "".join(output.get("text", "") for cell in code for output in cell.outputs if output["output_type"] == "stream")
    noise = [marker for marker in LIBRARY_NOISE if marker in streams]
    assert not noise, f"{noise} in the cells' output:\n{streams[-3000:]}"
    assert not any(output["output_type"] == "error" for cell in code for output in cell.outputs), json.dumps(code[-1].outputs)[:3000]

"""The ``[tracking]`` section: the experiment trackers every trial is also logged to.

```toml
[tracking]
mlflow = "http://127.0.0.1:5000"   # an MLflow tracking URI (a server, or file:///a/folder)
wandb = "my-project"               # a Weights & Biases project
tensorboard = "runs"               # a folder: one event folder per trial under <folder>/<study>/
```

``launch --mlflow/--wandb/--tensorboard`` override the fields. The section is not part of a
study's identity: a resumed study may log to other trackers.
"""

from __future__ import annotations

import re

from pydantic import field_validator, model_validator

from autofinetune.spec.base import StrictModel

#: URI schemes an MLflow tracking URI may use (a plain path is a local file store too).
MLFLOW_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "databricks")


class TrackingSpec(StrictModel):
    """Where trials are logged besides the study database; every field is off by default."""

    #: An MLflow tracking URI: one run per trial, nested under a run of the study.
    mlflow: str | None = None
    #: Register the best trial's model in MLflow's model registry under this name (a new
    #: version each launch); the model is logged on the study's run either way.
    mlflow_register: str | None = None
    #: A Weights & Biases project: one run per trial, grouped by the study's name.
    wandb: str | None = None
    #: A TensorBoard log folder (relative to the spec's folder): ``<folder>/<study>/trial_<n>``.
    tensorboard: str | None = None

    @field_validator("mlflow")
    @classmethod
    def _mlflow_uri(cls, value: str | None) -> str | None:
        if value is None:
            return None
        match = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*)://", value)
        if not value.strip():
            raise ValueError("got ''; give an MLflow tracking URI such as http://HOST:5000 or file:///a/folder")
        if match and match.group(1).split("+")[0].lower() not in MLFLOW_SCHEMES:
            raise ValueError(
                f"an MLflow tracking URI starts with one of {', '.join(s + '://' for s in MLFLOW_SCHEMES)} "
                "or is a folder path"
            )
        return value

    @field_validator("mlflow_register")
    @classmethod
    def _model_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", value):
            raise ValueError("a registered model name uses letters, digits, '_', '.', '-' (at most 128 characters)")
        return value

    @model_validator(mode="after")
    def _register_needs_mlflow(self) -> "TrackingSpec":
        if self.mlflow_register is not None and self.mlflow is None:
            raise ValueError(
                f"tracking.mlflow_register: got {self.mlflow_register!r}, but no MLflow tracking URI is set; "
                "give tracking.mlflow (or --mlflow) too"
            )
        return self

    @field_validator("wandb")
    @classmethod
    def _wandb_project(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}", value):
            raise ValueError(
                "a Weights & Biases project name uses letters, digits, '_', '.', '-' "
                "(at most 128 characters)"
            )
        return value

    @field_validator("tensorboard")
    @classmethod
    def _tensorboard_dir(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("got ''; give a folder for TensorBoard's event files")
        return value

    @property
    def enabled(self) -> bool:
        """Whether any tracker is configured."""
        return any((self.mlflow, self.wandb, self.tensorboard))

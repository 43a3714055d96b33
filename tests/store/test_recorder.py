"""The trial recorder: what it stores on the study, and when the search must stop."""

from __future__ import annotations

import pytest

from autofinetune.errors import FatalError
from autofinetune.spec import parse_spec
from autofinetune.store.database import STUDY_CLASSES_ATTR, STUDY_FINGERPRINT_ATTR, open_storage
from autofinetune.engines.recorder import MAX_CONSECUTIVE_ERRORS, ConsecutiveFailures, TrialRecorder
from autofinetune.store.study import create_or_resume_study

from conftest import tiny_spec_dict


def test_load_data_stores_fingerprint_and_class_names_and_refuses_other_images(tmp_path):
    spec = parse_spec(tiny_spec_dict(name="data"), base_dir=tmp_path)
    study, _ = create_or_resume_study(spec, open_storage(f"sqlite:///{tmp_path / 'study.db'}"))
    data = TrialRecorder(study, spec).load_data()
    assert study.user_attrs[STUDY_FINGERPRINT_ATTR] == data.fingerprint
    assert study.user_attrs[STUDY_CLASSES_ATTR] == ["class_0", "class_1", "class_2"]

    study.set_user_attr(STUDY_FINGERPRINT_ATTR, "0" * 64)  # as if the study began on other images
    with pytest.raises(FatalError, match="differs from the data the study started with"):
        TrialRecorder(study, spec).load_data()


def test_consecutive_failures_stop_the_search_at_the_limit_and_a_result_resets_them():
    failures = ConsecutiveFailures()
    for _ in range(MAX_CONSECUTIVE_ERRORS - 1):
        assert failures.failed("ValueError: broken") is None
    failures.succeeded()
    for _ in range(MAX_CONSECUTIVE_ERRORS - 1):
        assert failures.failed("ValueError: broken") is None
    assert failures.failed("ValueError: broken") == "3 trials in a row failed; last: ValueError: broken"

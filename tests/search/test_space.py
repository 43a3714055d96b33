"""The values a search-space parameter allows."""

from __future__ import annotations

import pytest

from autofinetune.search.space import integer_values
from autofinetune.spec.params import parse_param


@pytest.mark.parametrize(
    ("raw", "values"),
    [
        ({"low": 0, "high": 6}, [0, 1, 2, 3, 4, 5, 6]),
        ({"low": 1, "high": 7, "step": 3}, [1, 4, 7]),
        ([6, 2, 0], [0, 2, 6]),
        (3, [3]),
    ],
)
def test_integer_values_lists_every_depth_the_search_can_ask_for(raw, values):
    assert integer_values(parse_param("unfreeze_depth", raw)) == values


def test_a_range_of_real_numbers_has_no_integer_values():
    assert integer_values(parse_param("phase1_lr", {"low": 1e-4, "high": 1e-2, "log": True})) == []

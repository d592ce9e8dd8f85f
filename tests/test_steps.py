from __future__ import annotations

import pytest

from stability.errors import ConfigError
from stability.steps import Step, format_step, to_iterations


@pytest.mark.parametrize(
    "text, epochs, iterations",
    [("500it", 0, 500), ("2ep", 2, 0), ("2ep50it", 2, 50), ("0it", 0, 0), ("120", 0, 120), (" 3ep 4it ", 3, 4)],
)
def test_parse_forms(text, epochs, iterations):
    assert Step.parse(text) == Step(epochs, iterations)


def test_integers_are_iterations():
    assert Step.parse(7) == Step(0, 7)


def test_conversion_uses_iterations_per_epoch():
    assert to_iterations("2ep50it", 58) == 166
    assert to_iterations("160ep", 390) == 62400


def test_round_trip_string():
    assert str(Step.parse("2ep50it")) == "2ep50it"
    assert str(Step.parse("2ep")) == "2ep"
    assert format_step(40) == "40it"


@pytest.mark.parametrize("bad", ["", "it", "5 iterations", "-3it", "2.5ep", "ep5", -1, True, None, 1.5])
def test_malformed_steps_name_the_setting(bad):
    with pytest.raises(ConfigError, match="training.steps"):
        Step.parse(bad, "training.steps")

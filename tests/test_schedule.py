from __future__ import annotations

import math

import pytest

from stability.config import Config
from stability.engine import Schedule, derive_seed


def _schedule(**sets):
    return Schedule(Config().with_overrides({"optimizer.lr": "0.1", "training.steps": "100it", **sets}), ipe=10)


def test_constant():
    s = _schedule()
    assert s.lr(0) == s.lr(99) == 0.1


def test_step_decay_at_milestones_in_epochs():
    s = _schedule(**{"schedule.kind": "step", "schedule.milestones": "2ep,80it", "schedule.gamma": "0.1"})
    assert s.lr(19) == pytest.approx(0.1)
    assert s.lr(20) == pytest.approx(0.01)
    assert s.lr(80) == pytest.approx(0.001)


def test_linear_warmup_then_cosine():
    s = _schedule(**{"schedule.kind": "cosine", "schedule.warmup": "10it"})
    assert s.lr(0) == pytest.approx(0.1 * 1 / 10 * 0.5 * (1 + math.cos(0)))
    assert s.lr(50) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert s.lr(100) == pytest.approx(0.0, abs=1e-12)


def test_derived_seeds_are_stable_and_distinct():
    # Pinned: a change to derive_seed would re-seed every run's data order, augmentation and siblings
    # without changing any run hash. These values must never change.
    a, b, c = derive_seed(0, "order"), derive_seed(1, "order"), derive_seed(0, "augment")
    assert (a, b, c) == (3278857439845718984, 8307011275362835592, 3352880350943661409)
    assert derive_seed(0, "sibling", 0, 1, "order") == 6838277635648654259  # a sibling's order seed
    assert a != b and b != c and a != c
    assert 0 <= derive_seed(5, "x") < 2**63

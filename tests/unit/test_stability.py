"""Range-stability tracking over observer histories."""

from __future__ import annotations

import pytest
import torch

import ptqkit as pq
from ptqkit.calibration.stability import range_stability, relative_changes
from ptqkit.core.errors import ConfigError
from ptqkit.observers import make_observer


def test_classifies_stable_and_unstable_layers() -> None:
    histories = {
        "settles": [
            (-1.0, 1.0),
            (-2.0, 2.0),
            (-2.0, 2.01),
            (-2.0, 2.01),
            (-2.0, 2.01),
            (-2.0, 2.01),
            (-2.0, 2.01),
            (-2.0, 2.01),
        ],
        "keeps_growing": [(-1.0, float(i)) for i in range(1, 9)],
        "constant": [(0.0, 1.0)] * 6,
        "too_short": [(0.0, 1.0)] * 3,
    }
    result = range_stability(histories, rel_tol=0.01, window=5)
    assert result.stabilized == {"settles": 1, "constant": 0}
    assert result.unstable == ["keeps_growing", "too_short"]
    assert not result.all_stable


def test_relative_changes_closed_form() -> None:
    assert relative_changes([(0.0, 1.0), (0.0, 2.0), (-1.0, 2.0)]) == [0.5, 1 / 3]


def test_real_observer_history_stabilizes_on_iid_data() -> None:
    obs = make_observer(pq.QuantSpec(qtype="int8"))
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        obs.update(torch.randn(4096, generator=g))
    result = range_stability({"layer": obs.history}, rel_tol=0.02, window=10)
    assert "layer" in result.stabilized and result.stabilized["layer"] < 50


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError, match=r"rel_tol=0 must be in \(0, 1\)"):
        range_stability({}, rel_tol=0)
    with pytest.raises(ConfigError, match="window=0 must be a positive integer"):
        range_stability({}, window=0)

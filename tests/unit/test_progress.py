"""The progress bar: what it shows when enabled, nothing when disabled."""
from __future__ import annotations

from ptqkit.core.progress import peak_rss_bytes, progress_bar


def test_bar_shows_count_step_and_peak_memory(capsys) -> None:
    with progress_bar("quantizing 2 block(s)", 2, True) as advance:
        advance(1, current="model.layers.1")
        advance(1)
    err = capsys.readouterr().err
    assert "quantizing 2 block(s)" in err and "2/2" in err and "peak" in err and "GiB" in err


def test_disabled_bar_is_silent(capsys) -> None:
    with progress_bar("calibrating", 3, False) as advance:
        advance(1, current="x")
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_peak_rss_is_plausible() -> None:
    assert 10 * 2**20 < peak_rss_bytes() < 64 * 2**30  # a Python process with torch: tens of MB to GBs

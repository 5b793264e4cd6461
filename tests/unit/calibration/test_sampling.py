"""Sampling: seeded subsets, largest-remainder class shares (vs brute force), reservoir sampling."""

from __future__ import annotations

import itertools
from collections import Counter
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ptqkit.calibration import sampling
from ptqkit.core.errors import CalibrationDataError, ConfigError


def test_select_all_when_no_limit_or_limit_too_large() -> None:
    assert sampling.select_indices(5, None, 0) == [0, 1, 2, 3, 4]
    assert sampling.select_indices(5, 9, 0) == [0, 1, 2, 3, 4]


def test_select_subset_is_seeded_sorted_and_distinct() -> None:
    a = sampling.select_indices(100, 10, seed=3)
    assert a == sampling.select_indices(100, 10, seed=3)
    assert a == sorted(set(a)) and len(a) == 10 and all(0 <= i < 100 for i in a)
    assert a != sampling.select_indices(100, 10, seed=4)


def test_class_shares_hand_example() -> None:
    # quotas 5*7/10=3.5, 5*2/10=1.0, 5*1/10=0.5 -> floors 3,1,0; one left; remainders tie 0.5/0.5 -> first class
    assert sampling.class_shares([7, 2, 1], 5) == [4, 1, 0]
    assert sampling.class_shares([50, 30, 20], 10) == [5, 3, 2]
    assert sampling.class_shares([1, 1, 1], 2) == [1, 1, 0]


def _brute_force_best(counts: list[int], limit: int) -> float:
    """Smallest squared distance to the exact quotas over all integer allocations summing to limit."""
    total = sum(counts)
    quotas = [Fraction(limit * n, total) for n in counts]
    best = None
    for alloc in itertools.product(*(range(min(n, limit) + 1) for n in counts)):
        if sum(alloc) != limit:
            continue
        dist = sum((a - q) ** 2 for a, q in zip(alloc, quotas))
        best = dist if best is None or dist < best else best
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.data())
def test_class_shares_match_brute_force_optimum(counts: list[int], data: st.DataObject) -> None:
    limit = data.draw(st.integers(1, sum(counts)))
    shares = sampling.class_shares(counts, limit)
    total = sum(counts)
    quotas = [Fraction(limit * n, total) for n in counts]
    assert sum(shares) == limit
    assert all(
        q.__floor__() <= s <= q.__ceil__() and s <= n for s, q, n in zip(shares, quotas, counts)
    )
    assert sum((s - q) ** 2 for s, q in zip(shares, quotas)) == _brute_force_best(counts, limit)


def test_stratified_keeps_proportions_and_is_seeded() -> None:
    labels = ["cat"] * 60 + ["dog"] * 30 + ["owl"] * 10
    index, classes = sampling.stratified_indices(labels, 20, seed=0)
    assert classes == {"cat": 12, "dog": 6, "owl": 2}
    assert Counter(labels[i] for i in index) == Counter({"cat": 12, "dog": 6, "owl": 2})
    assert index == sorted(set(index))
    assert index == sampling.stratified_indices(labels, 20, seed=0)[0]
    assert index != sampling.stratified_indices(labels, 20, seed=1)[0]


def test_stratified_without_limit_uses_everything() -> None:
    index, classes = sampling.stratified_indices([1, 0, 1], None, seed=0)
    assert index == [0, 1, 2] and classes == {"1": 2, "0": 1}


def test_reservoir_is_uniform_and_seeded() -> None:
    n, k, trials = 10, 3, 3000
    hits = Counter()
    for seed in range(trials):
        chosen, seen = sampling.reservoir_sample(iter(range(n)), k, seed)
        assert seen == n and len(chosen) == k
        assert [i for i, _ in chosen] == sorted(i for i, _ in chosen) and all(
            i == v for i, v in chosen
        )
        hits.update(i for i, _ in chosen)
    # each item is kept with probability k/n = 0.3: binomial sd sqrt(3000*.3*.7) ~ 25; allow 5 sd
    assert all(abs(hits[i] - trials * k / n) < 5 * 25.1 for i in range(n)), hits
    assert sampling.reservoir_sample(range(n), k, 7) == sampling.reservoir_sample(range(n), k, 7)


def test_take_reads_nothing_past_the_limit() -> None:
    pulled = []

    def stream():
        for i in range(100):
            pulled.append(i)
            yield i

    assert [v for _, v in sampling.take(stream(), 3)] == [0, 1, 2]
    assert pulled == [0, 1, 2]


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_bad_limit(bad: object) -> None:
    with pytest.raises(
        ConfigError, match=r"limit=.* is not valid: use None \(all samples\) or a positive integer"
    ):
        sampling.check_limit(bad)


def test_bad_seed() -> None:
    with pytest.raises(
        ConfigError, match=r"seed=1.5 is not valid: the sampling seed must be an integer"
    ):
        sampling.check_seed(1.5)


def test_label_errors() -> None:
    with pytest.raises(CalibrationDataError, match=r"stratify_by: 2 labels for 3 samples"):
        sampling.normalize_labels([0, 1], 3)
    with pytest.raises(
        CalibrationDataError, match=r"labels tensor has shape \(3, 1\); expected 1-D"
    ):
        import torch

        sampling.normalize_labels(torch.zeros(3, 1), 3)
    with pytest.raises(CalibrationDataError, match=r"label 1 \(\[1\]\) is not hashable"):
        sampling.normalize_labels([0, [1], 2], 3)

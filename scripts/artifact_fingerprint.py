"""Quantize three real models with fixed recipes and data, save each artifact, and print the
SHA-256 of every file: the determinism check behind refactors that must not change behaviour
(MiniLM W8A8, SmolLM2 GPTQ W4A16, MobileNetV2 CLE + bias correction).

    python scripts/artifact_fingerprint.py --out fingerprints.json

Run it before and after a change on the same machine and compare the JSON files: every hash must
match. Calibration is kept small (the check is about identical code paths, not accuracy).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

import torch

import ptqkit as pq
from ptqkit.models import corpora, zoo

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _hashes(directory: Path) -> dict[str, str]:
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _minilm(out: Path) -> None:
    model, tokenizer = zoo.load_minilm()
    calib = pq.CalibrationData.from_text(corpora.shakespeare_texts(32, seed=0), tokenizer, max_length=64, batch_size=8)
    recipe = pq.Recipe.load(RECIPES / "w8a8-encoder.yaml")
    pq.save(pq.quantize(model, recipe, calib, progress=False), out)


def _smollm2(out: Path) -> None:
    model, tokenizer = zoo.load_smollm2()
    texts = corpora.shakespeare_texts(8, seed=0, min_chars=300, max_chars=2000)
    calib = pq.CalibrationData.from_text(texts, tokenizer, max_length=128, batch_size=4)
    recipe = pq.Recipe.load(RECIPES / "w4a16-gptq-llm.yaml")
    pq.save(pq.quantize(model, recipe, calib, progress=False), out)


def _mobilenet(out: Path) -> None:
    model = zoo.load_mobilenet_v2()
    crops = corpora.photo_crops(32, seed=0, source="calib")
    calib = pq.CalibrationData.from_tensors(crops, batch_size=8)
    recipe = pq.Recipe.load(RECIPES / "w8a8-cnn-cle-bc.yaml")
    pq.save(pq.quantize(model, recipe, calib, progress=False), out)


CASES = {"minilm-w8a8": _minilm, "smollm2-gptq-w4a16": _smollm2, "mobilenet_v2-cle-bc": _mobilenet}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file: case -> file -> sha256")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:
            CASES[case](Path(tmp) / case)
            result[case] = _hashes(Path(tmp) / case)
            print(case, json.dumps(result[case], indent=1))
    args.out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()

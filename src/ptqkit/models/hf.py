"""Load Hugging Face models from LOCAL directories only (never the hub), and make GGUF-loaded
models saveable.

transformers is imported lazily inside the functions: importing ptqkit does not import it.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from ptqkit.core.errors import ConfigError, UnsupportedModelError

__all__ = ["TASKS", "load_hf_model", "infer_task", "rebuild_from_state"]

logger = logging.getLogger(__name__)

TASKS = ("auto", "causal_lm", "encoder")
_ATTN = ("eager", "sdpa")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise UnsupportedModelError(
            "loading a Hugging Face model needs transformers, which is not installed; "
            "install it with `pip install 'ptqkit[hf]'`"
        ) from exc
    return transformers


def infer_task(config: dict[str, Any], *, source: str) -> str:
    """'causal_lm' when the config's ``architectures`` name a ...ForCausalLM class, else 'encoder'.

    ``source`` names where the config came from, for the error message.
    """
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list):
        raise ConfigError(f"{source}: 'architectures' is {architectures!r}; expected a list of class names")
    if any(str(a).endswith("ForCausalLM") for a in architectures):
        return "causal_lm"
    if config.get("is_decoder") or config.get("model_type") in ("llama", "gpt2", "mistral", "qwen2", "opt"):
        return "causal_lm"
    return "encoder"


def _check_args(path: Path, task: str, gguf_file: str | None, dtype: torch.dtype, attn: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"load_hf_model task={task!r} is invalid; valid tasks are {', '.join(TASKS)}")
    if attn not in _ATTN:
        raise ConfigError(
            f"load_hf_model attn_implementation={attn!r} is invalid; valid values are {', '.join(_ATTN)}"
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"load_hf_model dtype={dtype!r} is invalid; pass a floating torch.dtype such as torch.float32")
    if not path.exists():
        raise UnsupportedModelError(
            f"model directory {str(path)!r} does not exist; ptqkit loads Hugging Face models from a local "
            "directory only (config.json + weights, or a .gguf file)"
        )
    if not path.is_dir():
        raise UnsupportedModelError(f"model path {str(path)!r} is not a directory; pass the directory that holds config.json")
    if gguf_file is not None:
        if Path(gguf_file).name != gguf_file:
            raise ConfigError(f"gguf_file={gguf_file!r} must be a file name inside {str(path)!r}, not a path")
        if not (path / gguf_file).is_file():
            present = sorted(p.name for p in path.glob("*.gguf"))
            raise UnsupportedModelError(
                f"GGUF file {gguf_file!r} not found in {str(path)!r}; .gguf files there: {present or 'none'}"
            )
    elif not (path / "config.json").is_file():
        raise UnsupportedModelError(
            f"{str(path)!r} has no config.json, so it is not a Hugging Face model directory "
            "(for a .gguf model pass gguf_file=...)"
        )


def load_hf_model(
    path: str | Path,
    *,
    task: str = "auto",
    gguf_file: str | None = None,
    dtype: torch.dtype = torch.float32,
    attn_implementation: str = "eager",
) -> tuple[Any, Any]:
    """Load (model, tokenizer) from a local HF directory, in eval mode.

    task: 'causal_lm' (AutoModelForCausalLM), 'encoder' (AutoModel), or 'auto' (from the
    config's ``architectures``; a GGUF file is taken as a causal LM). gguf_file: a file name
    inside ``path``; transformers + gguf dequantize its tensors to ``dtype``. Nothing is fetched
    from the hub (``local_files_only=True``).
    """
    path = Path(path).expanduser()
    _check_args(path, task, gguf_file, dtype, attn_implementation)
    if task == "auto":
        if gguf_file is not None:
            task = "causal_lm"
        else:
            config_path = path / "config.json"
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as exc:
                raise UnsupportedModelError(f"cannot read {config_path}: {exc}") from exc
            task = infer_task(config, source=str(config_path))
    transformers = _import_transformers()
    auto = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModel
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file is not None else {}
    start = time.perf_counter()
    try:
        model = auto.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **extra
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, **extra)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(
            f"transformers could not load {task} model from {str(path)!r}"
            f"{f' (gguf_file={gguf_file!r})' if gguf_file else ''}: {exc}"
        ) from exc
    logger.info("loaded %s from %s in %.1f s", type(model).__name__, path, time.perf_counter() - start)
    return model.eval(), tokenizer


def load_hf_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local Hugging Face directory (without loading the model)."""
    transformers = _import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise UnsupportedModelError(f"transformers could not load the tokenizer of {str(path)!r}: {exc}") from exc


def _no_init_weights() -> Any:
    """transformers' context manager that skips weight initialisation (moved between versions)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def rebuild_from_state(model: Any) -> Any:
    """A fresh, ordinary HF model of the same class built from ``model.config`` and its state dict.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF; the rebuilt model has
    identical parameters and buffers (checked) and saves normally. Tied weights stay tied. Its
    config drops the GGUF loader's ``quantization_config`` (the weights are dequantized already:
    other tools reading it would refuse the model as "quantized in a different format").
    """
    transformers = _import_transformers()
    if not isinstance(model, transformers.PreTrainedModel):
        raise UnsupportedModelError(
            f"rebuild_from_state needs a transformers PreTrainedModel, got {type(model).__name__}"
        )
    config = model.config.__class__.from_dict(model.config.to_dict())
    dtype = next(model.parameters()).dtype
    for attr in ("gguf_file", "_gguf_file", "quantization_config"):  # the rebuilt model is plain float
        if hasattr(config, attr):
            delattr(config, attr)
    config._attn_implementation = model.config._attn_implementation
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _no_init_weights():  # every parameter is overwritten below: skip the random init
            fresh = model.__class__(config)
    finally:
        torch.set_default_dtype(previous)
    state = model.state_dict()
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = set(getattr(fresh, "_tied_weights_keys", None) or [])
    real_missing = [k for k in missing if k not in tied]
    if real_missing or unexpected:
        raise UnsupportedModelError(
            f"rebuilding {type(model).__name__} from its state dict failed: missing={real_missing}, "
            f"unexpected={list(unexpected)}"
        )
    fresh.tie_weights()
    fresh_buffers = dict(fresh.named_buffers())
    for name, buffer in model.named_buffers():  # non-persistent ones (e.g. RoPE inv_freq) too
        other = fresh_buffers.get(name)
        if other is None or other.shape != buffer.shape or not torch.equal(other, buffer):
            raise UnsupportedModelError(
                f"rebuilding {type(model).__name__}: buffer {name!r} differs from the loaded model's"
            )
    fresh.generation_config = model.generation_config
    return fresh.eval()

"""Load Hugging Face models from LOCAL directories only (never the hub), and make GGUF-loaded
models saveable.

transformers is imported lazily inside the functions: importing ptqkit does not import it.
"""
from __future__ import annotations

import json
import logging
import pickle
import time
from pathlib import Path
from typing import Any

import torch

from ptqkit.core.errors import ConfigError, UnsupportedModelError

__all__ = ["TASKS", "check_hf_config", "load_hf_model", "infer_task", "rebuild_from_state"]

logger = logging.getLogger(__name__)

TASKS = ("auto", "causal_lm", "encoder")
_ATTN = ("eager", "sdpa")
MAX_CONFIG_BYTES = 10_000_000  # config.json files are a few kB
# Sizes a config.json may state, with sanity bounds far above any released model: a config
# asking for more would allocate (or loop) for ever before anything else could fail.
_SIZE_KEYS = {
    "num_hidden_layers": 4096, "n_layer": 4096, "num_layers": 4096, "hidden_size": 2**20, "n_embd": 2**20,
    "d_model": 2**20, "num_attention_heads": 2**16, "n_head": 2**16, "num_key_value_heads": 2**16,
    "intermediate_size": 2**24, "ffn_dim": 2**24, "n_inner": 2**24, "vocab_size": 2**27, "max_position_embeddings": 2**27,
    "n_positions": 2**27, "head_dim": 2**16,
}


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


def check_hf_config(path: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of the local Hugging Face directory `path`, checked before any
    model is built: a JSON object, its size fields positive integers within sanity bounds, and
    accepted by transformers' own config class. UnsupportedModelError naming the file otherwise."""
    config_path = Path(path).expanduser() / "config.json"
    try:
        with config_path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise UnsupportedModelError(f"cannot read {config_path}: {exc}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise UnsupportedModelError(f"{config_path} is larger than {MAX_CONFIG_BYTES} bytes; not a Hugging Face config")
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError, a number of more than 4300 digits
        raise UnsupportedModelError(f"cannot read {config_path}: not valid JSON ({exc})") from None
    except RecursionError:
        raise UnsupportedModelError(f"cannot read {config_path}: JSON nested too deeply") from None
    if not isinstance(config, dict):
        raise UnsupportedModelError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    for key, bound in _SIZE_KEYS.items():
        value = config.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= bound):
            raise UnsupportedModelError(f"{config_path}: {key}={value!r:.40} must be an integer in [1, {bound}]")
    infer_task(config, source=str(config_path))  # 'architectures' must be a list
    transformers = _import_transformers()
    try:
        transformers.AutoConfig.from_pretrained(str(config_path.parent), local_files_only=True)
    except Exception as exc:  # transformers and huggingface_hub raise many types for a bad config
        raise UnsupportedModelError(f"{config_path}: transformers refuses this config: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return config


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
            task = infer_task(check_hf_config(path), source=str(path / "config.json"))
    elif gguf_file is None:
        check_hf_config(path)
    transformers = _import_transformers()
    auto = transformers.AutoModelForCausalLM if task == "causal_lm" else transformers.AutoModel
    extra: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file is not None else {}
    start = time.perf_counter()
    try:
        model = auto.from_pretrained(
            str(path), dtype=dtype, attn_implementation=attn_implementation, local_files_only=True, **extra
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True, **extra)
    except pickle.UnpicklingError as exc:
        raise UnsupportedModelError(
            f"{str(path)!r}: the weights are a pickle (pytorch_model.bin) holding more than tensors, which ptqkit "
            "does not load (unpickling can run code); convert them to model.safetensors"
        ) from exc
    except Exception as exc:  # transformers, safetensors and torch raise many types for a bad directory
        detail = "truncated or corrupted weights: " if type(exc).__name__ == "SafetensorError" else ""
        raise UnsupportedModelError(
            f"transformers could not load {task} model from {str(path)!r}"
            f"{f' (gguf_file={gguf_file!r})' if gguf_file else ''}: {detail}{type(exc).__name__}: {str(exc)[:300]}"
        ) from exc
    logger.info("loaded %s from %s in %.1f s", type(model).__name__, path, time.perf_counter() - start)
    return model.eval(), tokenizer


def load_hf_tokenizer(path: str | Path) -> Any:
    """The tokenizer of a local Hugging Face directory (without loading the model)."""
    transformers = _import_transformers()
    if (Path(path).expanduser() / "config.json").is_file():
        check_hf_config(path)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(Path(path).expanduser()), local_files_only=True)
    except Exception as exc:  # transformers and tokenizers raise many types for a bad directory
        raise UnsupportedModelError(f"transformers could not load the tokenizer of {str(path)!r}: {type(exc).__name__}: {str(exc)[:300]}") from exc


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

"""`import ptqkit` must not load optional dependencies (checked in a fresh interpreter)."""
from __future__ import annotations

import json
import subprocess
import sys

OPTIONAL = ("onnx", "onnxruntime", "onnxscript", "onnx_ir", "transformers", "matplotlib", "safetensors", "gguf", "rich", "yaml", "scipy", "sklearn", "skimage", "jinja2")


def test_import_ptqkit_loads_no_optional_dependency() -> None:
    code = (
        "import json, sys; import ptqkit; "
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({list(OPTIONAL)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_public_api_is_listed() -> None:
    import ptqkit

    missing = [name for name in ptqkit.__all__ if not hasattr(ptqkit, name)]
    assert missing == []

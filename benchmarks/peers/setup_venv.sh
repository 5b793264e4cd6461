#!/usr/bin/env bash
# Creates .venv-peers at the repo root: the peer quantization tools (llm-compressor, NNCF) in their
# own environment so ptqkit's dependencies stay clean. Same CPU torch as ptqkit (constraints.txt,
# plus the local wheel directory when the machine has one, exactly like the Makefile).
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
VENV=${PEERS_VENV:-.venv-peers}  # override to build elsewhere
FLAGS=(-c constraints.txt)
if [ -d /opt/wheels ]; then FLAGS+=(--find-links /opt/wheels); fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install "${FLAGS[@]}" -r benchmarks/peers/requirements.txt
"$VENV/bin/python" -c "import torch; assert not torch.version.cuda, torch.__version__; print('peers venv: torch', torch.__version__)"

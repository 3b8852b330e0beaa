#!/usr/bin/env bash
# Headless-Chromium screenshots of every page of the explorer over an index, taken by the same
# checker as the browser test (so a page with a traceback fails instead of being photographed).
# Usage: bash scripts/screenshots.sh [INDEX] [OUTDIR]   (needs Debian's chromium; on runs/demo the
# bad URLs of issue 15 are checked too). The app runs in its own process group and is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
index=${1:-runs/demo}
out=${2:-docs/screenshots}
extra=()
[ "$index" = "runs/demo" ] && extra=(--issue-urls)
python scripts/browser_check.py --index "$index" --screenshots "$out" "${extra[@]}"
ls -la "$out"

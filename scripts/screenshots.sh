#!/usr/bin/env bash
# Headless-Chromium screenshots of every page of the explorer over an index.
# Usage: bash scripts/screenshots.sh [INDEX] [OUTDIR]   (needs Debian's chromium)
set -euo pipefail
index=${1:-runs/demo}
out=${2:-docs/screenshots}
port=8765
mkdir -p "$out"
fra app --index "$index" --port $port > /tmp/fra_app.log 2>&1 &
app=$!
trap 'kill $app 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$port/_stcore/health" >/dev/null && break; sleep 1; done
shot() {  # name, query string; retried with more time while the page is still blank
  for budget in 20000 40000 80000 120000; do
    chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
      --disable-background-networking --disable-component-update --disable-sync \
      --user-data-dir="$(mktemp -d)" --window-size=1400,1100 --virtual-time-budget=$budget \
      --screenshot="$out/$1.png" "http://127.0.0.1:$port/?$2" 2>/dev/null
    [ "$(stat -c %s "$out/$1.png")" -gt 30000 ] && break
  done
}
shot feature "page=Feature+search&feature=${FEATURE:-100}&layer=${LAYER:-18}"
shot head "page=Head&layer=${LAYER:-18}&head=${HEAD:-6}"
shot channel "page=Channel&layer=${LAYER:-18}&head=${HEAD:-6}&fq=${FQ:-0}&fk=${FK:-0}"
shot sample "page=Sample&layer=${LAYER:-18}&head=${HEAD:-6}"
shot cih "page=CIH"
ls -la "$out"

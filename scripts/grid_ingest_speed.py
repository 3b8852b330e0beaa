"""Ingest cost of each SAE of a `fra train-sae` width x k grid: `fra ingest` of the same samples
at one layer, one process, in turn; writes reports/sae/grid/ingest_speed.json.

    python scripts/grid_ingest_speed.py runs/sae_grid --layer 17 --samples 32
"""

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from fra.ingest.index.build import IngestConfig, run
from fra.ingest.index.schema import Manifest

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("grid", type=Path, help="output directory of the grid run (one subdirectory per variant)")
parser.add_argument("--layer", type=int, default=17, help="the layer indexed")
parser.add_argument("--samples", type=int, default=32, help="corpus samples indexed per SAE")
parser.add_argument("--out", type=Path, default=Path("reports/sae/grid/ingest_speed.json"), help="result JSON")
args = parser.parse_args()

result = {}
for sae_dir in sorted(p for p in args.grid.iterdir() if (p / f"blocks.{args.layer}.ln1.hook_normalized").is_dir()):
    width, rest = sae_dir.name.split("x")
    k, objective = rest.split("-")
    out = Path(tempfile.mkdtemp(prefix="fra-grid-")) / "index"
    t0 = time.time()
    run(IngestConfig(out=out, sae=str(sae_dir), layers=(args.layer,), max_samples=args.samples, progress=False))
    st = Manifest.read(out).stats[str(args.layer)]
    name = f"{width}x{k}:{objective}"
    # the layer's own rate (count and statistics passes, merge), without loading the model
    result[name] = {
        "samples_per_s": st["samples_per_s"],
        "wall_s_with_loading": time.time() - t0,
        "channels_kept": st["channels_kept"],
        "channels_seen": st["channels_seen"],
        "samples": args.samples,
    }
    print(name, json.dumps(result[name]), flush=True)
    shutil.rmtree(out.parent)
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps(result, indent=1))

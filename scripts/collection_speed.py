"""Activation-collection speed of `fra train-sae` (both SAE layers from one truncated pass), fp32
against bf16 autocast, on the same corpus samples; prints tokens/s and the bf16 error.

    python scripts/collection_speed.py --samples 256 --threads 2
"""

import argparse
import time

import torch

from fra.ingest.corpus import padded_batches, read_corpus, tokenize_samples
from fra.ingest.registry import load_smollm2
from fra.ingest.sae.train import ActivationStream

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--samples", type=int, default=256, help="train-split samples, sorted by length as in training")
parser.add_argument("--batch-samples", type=int, default=16, help="samples per forward pass")
parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
args = parser.parse_args()
torch.set_num_threads(args.threads)

lm = load_smollm2(n_layers=19)
table = read_corpus("data/corpus.parquet", split="train")
toks = sorted(
    tokenize_samples([table["text"][i].as_py() for i in range(args.samples)], lm.tokenizer, lm.bos_id, 128), key=len
)
out = {}
for precision in ("fp32", "bf16", "fp32", "bf16"):  # the second round is the measured one (kernels warm)
    stream = ActivationStream(lm.model, [17, 18], precision, "cpu")
    t0, acts = time.time(), []
    for _, t, m in padded_batches(toks, args.batch_samples):
        acts.append(stream(t, m)[17])
    seconds = time.time() - t0
    out[precision] = torch.cat(acts)
    print(
        f"{precision}: {len(out[precision]) / seconds:,.0f} tokens/s ({len(out[precision]):,} tokens, "
        f"{args.threads} threads)"
    )
rel = (out["bf16"] - out["fp32"]).norm(dim=-1) / out["fp32"].norm(dim=-1)
print(
    f"bf16 relative error (layer 17): median {rel.median():.4f}, 99.9th percentile "
    f"{rel.quantile(0.999):.4f}, max {rel.max():.4f}"
)

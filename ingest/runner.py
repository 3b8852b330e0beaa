"""`fra ingest`: corpus -> exact feature-pair index (hive-partitioned Parquet + manifest).

Index layout (schema in docs/INDEX_SCHEMA.md):
  manifest.json
  rows/layer=L/head=H/part-0.parquet      kept FA entries: sample, q, k, feat_q, feat_k, value
  pairs/layer=L/head=H/part-0.parquet     per (sample, q, k): score, feature and other terms
  channels/layer=L/head=H/part-0.parquet  exact per-channel statistics over the whole corpus
  samples/part-0.parquet                  sample text, token ids and token strings
  features/part-0.parquet                 per-feature statistics and automatic labels

Phases, per layer: forward pass to the layer (batched), SAE encode, factored projections
(`decompose.project_tokens`), the per-sample reduction (`reduce.reduce_sample`), then one
write of the layer's partitions. Work happens in `<out>.staging/`; a layer counts as done
when its marker file exists, so a killed job resumes at the first unfinished layer and
recomputes it from scratch (the result is identical to an uninterrupted run). When all
layers are done the staging directory is renamed to `<out>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
MANIFEST_KEYS = {
    "schema_version", "model", "sae", "corpus", "code_version", "policy", "layers", "heads",
    "n_samples", "shard", "stats", "created",
}


class IndexError_(ValueError):
    """The index directory or the job's input is unusable; the message says why."""


@dataclass(frozen=True)
class IngestConfig:
    out: Path = Path("runs/demo")
    model: str = "smollm2-135m"
    corpus: Path | None = None  # a corpus Parquet; default: the shipped demo corpus
    split: str | None = None  # e.g. "heldout"; None takes every sample
    layers: tuple[int, ...] | None = None  # default: the model's SAE layers
    heads: tuple[int, ...] | None = None  # default: all heads
    max_samples: int | None = None
    max_tokens: int = 128
    shard: str = "0/1"  # i/n: samples with index % n == i
    top_m: int = 32  # rows kept per (head, query): the largest |FA| over all keys and feature pairs
    min_count: int = 128  # channels co-active in fewer (q, k) pairs over the corpus are not written
    q_block: int = 32
    device: str | None = None  # default: cuda when available
    progress: bool = True

    def __post_init__(self):
        try:
            i, n = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n, got {self.shard!r}") from None
        if not 0 <= i < n:
            raise ValueError(f"--shard {self.shard}: need 0 <= i < n")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError("--max-samples must be positive")
        if self.top_m < 1 or self.min_count < 1:
            raise ValueError("--top-m and --min-count must be at least 1")

    @property
    def shard_index(self) -> tuple[int, int]:
        i, n = (int(x) for x in self.shard.split("/"))
        return i, n


def code_version() -> str:
    """Hash of the ingest source files, so an index records exactly the code that built it."""
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("decompose.py", "reduce.py", "runner.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def read_manifest(index: Path) -> dict:
    path = Path(index) / "manifest.json"
    if not path.exists():
        raise IndexError_(f"{index} is not an FRA index (no manifest.json)")
    m = json.loads(path.read_text())
    unknown = set(m) - MANIFEST_KEYS
    missing = MANIFEST_KEYS - set(m)
    if unknown or missing:
        raise IndexError_(f"manifest of {index}: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
    if m["schema_version"] != SCHEMA_VERSION:
        raise IndexError_(f"index schema_version {m['schema_version']}, this code reads {SCHEMA_VERSION}")
    return m


def _fault_point(name: str) -> None:
    """Tests kill the job here with SIGKILL (like `kill -9`) when FRA_KILL_AT names this point."""
    if os.environ.get("FRA_KILL_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def _write_parquet(table, path: Path, row_group_size: int = 65536) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=row_group_size)


def _identity(cfg: IngestConfig, sae_hashes: dict, corpus_hash: str) -> dict:
    return {"model": cfg.model, "sae": sae_hashes, "corpus": corpus_hash}


def _check_existing(cfg: IngestConfig, identity: dict) -> None:
    """Refuse to overwrite another model's or SAE's index; same identity is rebuilt."""
    out = Path(cfg.out)
    if not out.exists():
        return
    if not (out / "manifest.json").exists():
        if any(out.iterdir()):
            raise IndexError_(f"{out} exists, is not empty and is not an FRA index; choose another --out")
        return
    m = json.loads((out / "manifest.json").read_text())
    theirs = {"model": m.get("model"), "sae": m.get("sae"), "corpus": m.get("corpus")}
    if theirs["model"] != identity["model"] or theirs["sae"] != identity["sae"]:
        raise IndexError_(
            f"{out} holds an index of model {theirs['model']} with SAEs {theirs['sae']}; this job "
            f"uses {identity['model']} with {identity['sae']}. Choose another --out or delete it."
        )


@dataclass
class Inputs:
    """What a job reads: built by `load_inputs` from the registry, or by a test by hand."""

    lm: object  # models.LoadedModel
    saes: dict
    layers: tuple
    sample_ids: list
    texts: list
    tokens: list
    corpus_hash: str
    sae_hashes: dict


def select_shard(n_rows: int, cfg: IngestConfig) -> list[int]:
    i, n = cfg.shard_index
    ids = [s for s in range(n_rows) if s % n == i]
    return ids[: cfg.max_samples] if cfg.max_samples else ids


def load_inputs(cfg: IngestConfig, device: str) -> Inputs:
    """Model, SAEs, tokenised samples (after shard and max_samples)."""
    from .corpus import DEMO_CORPUS, read_corpus, tokenize_samples
    from .models import get_entry, load_model
    from .train_sae import SAE_DIR, hook_name, load_shipped_sae

    entry = get_entry(cfg.model)
    layers = cfg.layers or entry.default_layers
    corpus = Path(cfg.corpus or DEMO_CORPUS)
    table = read_corpus(corpus, cfg.split)  # raises on missing / empty
    ids = select_shard(table.num_rows, cfg)
    if not ids:
        raise IndexError_(f"shard {cfg.shard} of {corpus} holds no samples")
    lm = load_model(cfg.model, device=device)
    check_layers_heads(lm.model, layers, cfg.heads)
    if entry.sae_release is None:
        saes = {l: load_shipped_sae(cfg.model, l, device) for l in layers}
        sae_hashes = {str(l): file_hash(SAE_DIR / cfg.model / hook_name(l) / "sae_weights.safetensors") for l in layers}
    else:
        from sae_lens import SAE

        saes = {l: SAE.from_pretrained(entry.sae_release, entry.sae_id_template.format(layer=l), device=device)
                for l in layers}
        sae_hashes = {str(l): f"{entry.sae_release}/{entry.sae_id_template.format(layer=l)}" for l in layers}
    texts = [table["text"][s].as_py() for s in ids]
    sample_ids = [int(table["sample_id"][s].as_py()) if "sample_id" in table.column_names else s for s in ids]
    tokens = tokenize_samples(texts, lm.tokenizer, lm.bos_id, min(cfg.max_tokens, lm.model.cfg.n_ctx))
    return Inputs(lm, saes, tuple(layers), sample_ids, texts, tokens, file_hash(corpus), sae_hashes)


def check_layers_heads(model, layers, heads) -> None:
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for l in layers:
        if not 0 <= l < n_layers:
            raise IndexError_(f"layer {l} out of range: the model has layers 0..{n_layers - 1}")
    for h in heads or ():
        if not 0 <= h < n_heads:
            raise IndexError_(f"head {h} out of range: the model has heads 0..{n_heads - 1}")


def _ingest_layer(cfg, lm, sae, layer, heads, sample_ids, tokens, work: Path, device: str) -> dict:
    """All partitions of one layer, written under `work`. Returns per-head statistics."""
    import numpy as np
    import pyarrow as pa
    import torch
    from tqdm import tqdm

    from .decompose import TERM_NAMES, build_projector, pair_terms, project_tokens, run_hooks
    from .reduce import ChannelAccumulator, induction_mask, reduce_sample

    model = lm.model
    proj = build_projector(model, layer, sae)
    H = model.cfg.n_heads
    F = sae.cfg.d_sae
    acc = ChannelAccumulator.zeros(F, H, device=device)
    ind_acc = ChannelAccumulator.zeros(F, H, device=device)
    rows = {h: [] for h in heads}
    pairs = {h: [] for h in heads}
    other = {
        "f_bdec": ["feat_bdec"], "f_err": ["feat_err"], "bdec_f": ["bdec_feat"], "err_f": ["err_feat"],
        "resid_resid": ["bdec_bdec", "bdec_err", "err_bdec", "err_err"],
        "bias": [t for t in TERM_NAMES if "bias" in t],
    }
    term_idx = {k: [TERM_NAMES.index(t) for t in v] for k, v in other.items()}
    fires_F = torch.zeros(F, dtype=torch.long, device=device)  # tokens where each feature fires
    bos_F = torch.zeros(F, dtype=torch.long, device=device)  # samples where it fires at position 0
    order = sorted(range(len(tokens)), key=lambda s: len(tokens[s]))
    bar = tqdm(total=len(tokens), desc=f"layer {layer}", unit="sample", disable=not cfg.progress)
    for s in order:  # one sequence at a time, so nothing is ever padded
        toks = torch.tensor(tokens[s], device=device)[None]
        hooks = run_hooks(model, layer, sae.cfg.metadata.hook_name, toks)
        acts = sae.encode(hooks.x_BTD)
        sparse, q, k, _ = project_tokens(proj, hooks.x_BTD, acts, sae.W_dec, sae.b_dec, hooks.norm_scale_BT)
        live = sparse.acts_BTA[0] != 0
        fires_F.index_add_(0, sparse.feat_idx_BTA[0][live], torch.ones_like(sparse.feat_idx_BTA[0][live]))
        bos_F.index_add_(0, sparse.feat_idx_BTA[0, 0][live[0]], torch.ones_like(sparse.feat_idx_BTA[0, 0][live[0]]))
        T = toks.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        ind = induction_mask(toks[0])
        res = reduce_sample(
            q.feat_BHTAE[0], k.feat_BHTAE[0], sparse.feat_idx_BTA[0], live,
            ind, acc, ind_acc, cfg.top_m, cfg.q_block,
        )
        terms = pair_terms(q, k)[:, 0]  # [C, H, Q, K]
        score = hooks.model_scores_BHQK[0]
        qi, ki = torch.nonzero(causal, as_tuple=True)
        sid = sample_ids[s]
        for h in heads:
            cols = {
                "sample": np.full(len(qi), sid, dtype=np.int32),
                "q": qi.cpu().numpy().astype(np.int16), "k": ki.cpu().numpy().astype(np.int16),
                "induction": ind[qi, ki].cpu().numpy(),
                "score": score[h, qi, ki].float().cpu().numpy(),
                "ff": res.ff_HQK[h, qi, ki].cpu().numpy(),
                "ff_abs": res.ff_abs_HQK[h, qi, ki].cpu().numpy(),
                "kept": res.kept_HQK[h, qi, ki].cpu().numpy(),
                "kept_abs": res.kept_abs_HQK[h, qi, ki].cpu().numpy(),
            }
            for name, idx in term_idx.items():
                cols[name] = terms[idx, h][:, qi, ki].sum(0).cpu().numpy()
            pairs[h].append(pa.table(cols))
            sel = res.rows_h == h
            rq, rk = res.rows_q[sel], res.rows_k[sel]
            rows[h].append(pa.table({
                "sample": np.full(int(sel.sum()), sid, dtype=np.int32),
                "q": rq.cpu().numpy().astype(np.int16), "k": rk.cpu().numpy().astype(np.int16),
                "feat_q": res.rows_fq[sel].cpu().numpy().astype(np.int32),
                "feat_k": res.rows_fk[sel].cpu().numpy().astype(np.int32),
                "value": res.rows_val[sel].cpu().numpy(),
                "induction": ind[rq, rk].cpu().numpy(),
            }))
        bar.update(1)
    bar.close()

    stats = {}
    fq, fk, count, s, ss, mn, mx = acc.nonzero(cfg.min_count)
    ifq, ifk, icount, isum, issq, imn, imx = ind_acc.nonzero(1)
    ikeys = (ifq * F + ifk).cpu().numpy()
    keys = (fq * F + fk).cpu().numpy()
    pos = np.searchsorted(ikeys, keys)  # both sorted ascending by key
    pos = np.clip(pos, 0, max(len(ikeys) - 1, 0))
    has_ind = (len(ikeys) > 0) & (ikeys[pos] == keys) if len(ikeys) else np.zeros(len(keys), bool)
    for h in heads:
        rows_t = pa.concat_tables(rows[h]).sort_by([("feat_q", "ascending"), ("feat_k", "ascending")])
        pairs_t = pa.concat_tables(pairs[h]).sort_by([("sample", "ascending"), ("q", "ascending"), ("k", "ascending")])
        def at(t, fill):
            v = np.full(len(keys), fill, dtype=np.float32)
            v[has_ind] = t[h].cpu().numpy()[pos[has_ind]]
            return v
        chan = pa.table({
            "feat_q": fq.cpu().numpy().astype(np.int32), "feat_k": fk.cpu().numpy().astype(np.int32),
            "count": count.cpu().numpy(),
            "sum": s[h].cpu().numpy(), "sumsq": ss[h].cpu().numpy(),  # float32, as accumulated
            "min": mn[h].cpu().numpy(), "max": mx[h].cpu().numpy(),
            "ind_count": np.where(has_ind, icount.cpu().numpy()[pos] if len(ikeys) else 0, 0),
            "ind_sum": at(isum, 0.0), "ind_sumsq": at(issq, 0.0),
            # NULL (not NaN) where a channel never met an induction target
            "ind_min": pa.array(at(imn, 0.0), mask=~has_ind), "ind_max": pa.array(at(imx, 0.0), mask=~has_ind),
        })
        part = f"layer={layer}/head={h}/part-0.parquet"
        _write_parquet(rows_t, work / "rows" / part)
        _write_parquet(pairs_t, work / "pairs" / part)
        _write_parquet(chan, work / "channels" / part)
        ff_abs = float(np.asarray(pairs_t["ff_abs"]).sum())
        stats[str(h)] = {
            "rows": rows_t.num_rows,
            "kept_abs_share": float(np.asarray(pairs_t["kept_abs"]).sum()) / ff_abs if ff_abs else 0.0,
        }
    stats["feature_fires"] = fires_F.cpu().tolist()
    stats["feature_bos"] = bos_F.cpu().tolist()
    stats["channels_seen"] = acc.n_seen()
    stats["channels_written"] = int(len(keys))
    stats["channels_dropped_below_min_count"] = acc.n_seen() - int(len(keys))
    stats["induction_channels_seen"] = ind_acc.n_seen()
    return stats


def _write_samples_and_features(cfg, lm, layers, sample_ids, texts, tokens, staging: Path, layer_stats: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .train_sae import SAE_DIR

    decode = lm.tokenizer.decode if lm.tokenizer is not None else (lambda ids: f"<{ids[0]}>")
    tok_strs = [[decode([t]) for t in ids] for ids in tokens]
    _write_parquet(pa.table({
        "sample": pa.array(sample_ids, pa.int32()), "text": texts,
        "token_ids": pa.array(tokens, pa.list_(pa.int32())), "tokens": tok_strs,
        "n_tokens": pa.array([len(t) for t in tokens], pa.int16()),
    }), staging / "samples" / "part-0.parquet")
    import pandas as pd

    n_tok = sum(len(t) for t in tokens)
    frames = []
    for layer in layers:
        st = layer_stats[str(layer)]
        fires, bos = st.pop("feature_fires"), st.pop("feature_bos")
        frames.append(pd.DataFrame({
            "layer": layer, "feature": range(len(fires)), "index_frequency": [f / n_tok for f in fires],
            "bos_rate": [b / len(tokens) for b in bos],
        }))
    df = pd.concat(frames)
    labels = SAE_DIR / cfg.model / "features.parquet"
    if labels.exists():
        df = df.merge(pq.read_table(labels).to_pandas(), on=["layer", "feature"], how="left")
    else:
        df["label"] = None
    # a feature is noise for the optional filter when it fires on BOS in most samples, or its
    # label's tokens hold no letter or digit
    tokens_in_label = df["label"].fillna("").str.findall(r'"([^"]*)"')
    punct = tokens_in_label.apply(lambda ts: bool(ts) and not any(any(c.isalnum() for c in t) for t in ts))
    df["punct_or_bos"] = punct | (df["bos_rate"] > 0.5)
    t = pa.Table.from_pandas(df, preserve_index=False)
    _write_parquet(t, staging / "features" / "part-0.parquet")


def run(cfg: IngestConfig, inputs: Inputs | None = None) -> Path:
    import torch

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out)
    t0 = time.time()
    inp = inputs or load_inputs(cfg, device)
    check_layers_heads(inp.lm.model, inp.layers, cfg.heads)
    lm, saes, layers, sample_ids, texts, tokens = inp.lm, inp.saes, inp.layers, inp.sample_ids, inp.texts, inp.tokens
    identity = _identity(cfg, inp.sae_hashes, inp.corpus_hash)
    _check_existing(cfg, identity)
    heads = tuple(cfg.heads) if cfg.heads else tuple(range(lm.model.cfg.n_heads))
    policy = {"top_m_per_head_query": cfg.top_m, "min_count": cfg.min_count, "max_tokens": cfg.max_tokens,
              "split": cfg.split, "max_samples": cfg.max_samples}
    staging = out.with_name(out.name + ".staging")
    job = {**identity, "code_version": code_version(), "policy": policy, "layers": list(layers),
           "heads": list(heads), "n_samples": len(tokens), "shard": cfg.shard}
    job_file = staging / "job.json"
    if staging.exists():
        prev = json.loads(job_file.read_text()) if job_file.exists() else None
        if prev != job:  # a different job was interrupted here: start over
            shutil.rmtree(staging)
    staging.mkdir(parents=True, exist_ok=True)
    job_file.write_text(json.dumps(job, sort_keys=True))
    stats = {}
    for layer in layers:
        done = staging / "_done" / f"layer={layer}.json"
        if done.exists():
            stats[str(layer)] = json.loads(done.read_text())
            continue
        for table in ("rows", "pairs", "channels"):  # remove a half-finished attempt
            shutil.rmtree(staging / table / f"layer={layer}", ignore_errors=True)
        work = staging / "_work" / f"layer={layer}"
        shutil.rmtree(work, ignore_errors=True)
        t1 = time.time()
        with torch.no_grad():
            st = _ingest_layer(cfg, lm, saes[layer], layer, heads, sample_ids, tokens, work, device)
        st["seconds"] = time.time() - t1
        st["samples_per_s"] = len(tokens) / st["seconds"]
        for table in ("rows", "pairs", "channels"):
            (staging / table).mkdir(exist_ok=True)
            os.replace(work / table / f"layer={layer}", staging / table / f"layer={layer}")
            _fault_point(f"moved:{layer}:{table}")
        shutil.rmtree(work)
        done.parent.mkdir(exist_ok=True)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(st))
        os.replace(tmp, done)
        _fault_point(f"done:{layer}")
        stats[str(layer)] = st
    _write_samples_and_features(cfg, lm, layers, sample_ids, texts, tokens, staging, stats)
    manifest = {"schema_version": SCHEMA_VERSION, **{k: v for k, v in job.items()}, "stats": stats,
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
    for extra in ("_done", "_work", "job.json"):
        p = staging / extra
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)
    if cfg.progress:
        print(f"index written to {out} in {time.time() - t0:.0f} s")
        for layer, st in stats.items():
            shares = [st[str(h)]["kept_abs_share"] for h in heads]
            print(f"  layer {layer}: {st['samples_per_s']:.2f} samples/s, channels written "
                  f"{st['channels_written']} (dropped {st['channels_dropped_below_min_count']} "
                  f"seen < {cfg.min_count} times), kept rows carry {min(shares):.1%}-{max(shares):.1%} of |FA|")
    return out

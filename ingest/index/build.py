"""`fra ingest`: corpus -> exact feature-pair index (hive-partitioned Parquet + manifest).

Per layer, two passes over the samples (one sequence at a time, so nothing is padded):
  1. count pass: forward pass to the layer, SAE encode, exact channel co-activation counts
     (`reduce.cooccurrence`) into a budgeted aggregator that spills to Parquet
     (`channels.CountAggregator`); channels with count >= min_count are kept;
  2. statistics pass, once per chunk of kept channels that fits the memory budget (usually
     once): the validated decomposition (`Decomposer.prepare`), the per-sample reduction
     (`reduce.reduce_sample`) into the chunk's accumulators (`channels.ChannelChunk`), and in
     the first sweep the rows and pairs, flushed to part files as the budget requires.
Then the layer's partitions move into place (`store.IndexWriter`). Table layouts are in
`schema.py` and docs/INDEX_SCHEMA.md.

Entry points: `run(IngestConfig)` (the CLI), and `ingest(model, saes, texts_or_tokens, ...)` for
a HookedTransformer and sae-lens SAEs that a user already holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import opt
from .schema import IndexFormatError, Manifest
from .store import IndexWriter, check_can_write


@dataclass(frozen=True)
class IngestConfig:
    out: Path = opt(Path("runs/demo"), "directory the index is written to (staged in OUT.staging, then renamed)")
    model: str = opt("smollm2-135m", "a preset (smollm2-135m, gpt2) or any model name TransformerLens can load")
    sae: str | None = opt(None, "SAEs: a sae-lens directory (or a directory of them, one per hook), or "
                                "RELEASE:ID of a sae-lens release ({layer} in ID is filled in); default: the preset's")
    hook: str | None = opt(None, "the hook the SAEs must read, e.g. blocks.{layer}.hook_resid_pre; checked against each SAE's own")
    corpus: Path | None = opt(None, "corpus Parquet with a `text` column; default: the shipped public-domain demo corpus")
    split: str | None = opt(None, "keep only rows of this `split` value (e.g. heldout); default: every row")
    layers: tuple[int, ...] | None = opt(None, "layers to index; default: the layers the SAEs are for")
    heads: tuple[int, ...] | None = opt(None, "heads to index; default: all")
    max_samples: int | None = opt(None, "index at most this many samples (after --shard); default: all")
    max_tokens: int = opt(128, "truncate each sample to this many tokens, BOS included")
    shard: str = opt("0/1", "i/n: index only the samples whose position is i mod n (merge shards with fra merge)")
    min_count: int = opt(128, "keep a channel only if its features co-occur in at least this many causal (q, k) pairs")
    top_keys: int = opt(4, "rows: per (head, query), the most-attended keys whose feature pairs are stored")
    top_pairs: int = opt(8, "rows: per such (query, key), the feature pairs of largest |FA| stored")
    examples_per_channel: int = opt(8, "examples stored per kept channel and head (largest |FA|, one per sample)")
    memory_budget_gb: float = opt(1.0, "memory for channel statistics and buffers; past it they spill to disk "
                                       "or take several sweeps (the model and one sample's work come on top)")
    q_block: int = opt(32, "queries whose pair values are formed at once (memory ~ heads x q_block x T x k^2 x 4 bytes)")
    device: str | None = opt(None, "torch device; default: cuda when available, else cpu")
    progress: bool = opt(True, "show progress bars and a summary")

    def __post_init__(self):
        try:
            i, n = (int(x) for x in self.shard.split("/"))
        except ValueError:
            raise ValueError(f"--shard must look like i/n, got {self.shard!r}") from None
        if not 0 <= i < n:
            raise ValueError(f"--shard {self.shard}: need 0 <= i < n")
        if self.max_samples is not None and self.max_samples <= 0:
            raise ValueError("--max-samples must be positive")
        for name in ("min_count", "top_keys", "top_pairs", "examples_per_channel", "q_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 2 <= self.max_tokens <= 32768:
            raise ValueError("--max-tokens must be in [2, 32768] (positions are stored as int16)")
        if self.memory_budget_gb <= 0:
            raise ValueError("--memory-budget-gb must be positive")

    @property
    def shard_index(self) -> tuple[int, int]:
        i, n = (int(x) for x in self.shard.split("/"))
        return i, n

    @property
    def policy(self) -> dict:
        return {"min_count": self.min_count, "top_keys": self.top_keys, "top_pairs": self.top_pairs,
                "examples_per_channel": self.examples_per_channel, "max_tokens": self.max_tokens,
                "split": self.split, "max_samples": self.max_samples}


@dataclass
class Inputs:
    """What a job reads: built by `load_inputs` from names, or by `Inputs.of` from objects."""

    lm: object  # registry.LoadedModel
    saes: dict  # layer -> sae-lens SAE
    sample_ids: list
    texts: list
    tokens: list
    corpus_hash: str
    sae_ids: dict  # str(layer) -> identity of the SAE's weights
    feature_table: Path | None = None  # the SAEs' features.parquet (labels), if they ship one
    layers: tuple = field(init=False)

    def __post_init__(self):
        self.layers = tuple(sorted(self.saes))

    @classmethod
    def of(cls, model, saes: dict, tokens: list[list[int]], texts: list[str] | None = None,
           tokenizer=None, name: str = "custom") -> "Inputs":
        """Inputs from a HookedTransformer and {layer: SAE} already in memory."""
        from ..registry import LoadedModel

        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        ids = {str(l): _weights_hash(s) for l, s in saes.items()}
        corpus = hashlib.sha256(repr(tokens).encode()).hexdigest()[:16]
        return cls(LoadedModel(name, model, tokenizer, tokens[0][0] if tokens and tokens[0] else 0), saes,
                   list(range(len(tokens))), texts or ["" for _ in tokens], tokens, corpus, ids)


def _weights_hash(sae) -> str:
    h = hashlib.sha256()
    for name, p in sorted(sae.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def select_shard(n_rows: int, cfg: IngestConfig) -> list[int]:
    i, n = cfg.shard_index
    ids = [s for s in range(n_rows) if s % n == i]
    return ids[: cfg.max_samples] if cfg.max_samples else ids


def load_inputs(cfg: IngestConfig, device: str) -> Inputs:
    """Model, SAEs and tokenised samples (after shard and max_samples), from the config's names."""
    from ..corpus import DEMO_CORPUS, read_corpus, tokenize_samples
    from ..registry import PRESETS, file_hash, load_model, sae_source

    corpus = Path(cfg.corpus or DEMO_CORPUS)
    table = read_corpus(corpus, cfg.split)  # raises on missing / empty
    ids = select_shard(table.num_rows, cfg)
    if not ids:
        raise IndexFormatError(f"shard {cfg.shard} of {corpus} holds no samples")
    source = sae_source(cfg.model, cfg.sae)
    layers = cfg.layers or source.layers() or (PRESETS[cfg.model].default_layers if cfg.model in PRESETS else None)
    if not layers:
        raise ValueError(f"cannot tell which layers the SAEs {cfg.sae!r} are for; pass --layers")
    lm = load_model(cfg.model, device=device)
    saes, sae_ids = {}, {}
    for layer in layers:
        if not 0 <= layer < lm.model.cfg.n_layers:
            raise IndexFormatError(f"layer {layer} out of range: the model has layers 0..{lm.model.cfg.n_layers - 1}")
        saes[layer], sae_ids[str(layer)] = source.load(layer, device)
        check_hook(saes[layer], cfg.hook, layer)
    texts = [table["text"][s].as_py() for s in ids]
    sample_ids = [int(table["sample_id"][s].as_py()) if "sample_id" in table.column_names else s for s in ids]
    tokens = tokenize_samples(texts, lm.tokenizer, lm.bos_id, min(cfg.max_tokens, lm.model.cfg.n_ctx))
    return Inputs(lm, saes, sample_ids, texts, tokens, file_hash(corpus), sae_ids, source.feature_table())


def check_hook(sae, hook: str | None, layer: int) -> None:
    """`--hook`, when given, must be the hook the SAE itself says it reads."""
    if hook is None:
        return
    want = hook.format(layer=layer)
    have = sae.cfg.metadata.hook_name
    if want != have:
        raise IndexFormatError(f"--hook {want} but the layer-{layer} SAE reads {have}; drop --hook or pick another SAE")


def check_heads(model, heads) -> None:
    n_heads = model.cfg.n_heads
    for h in heads or ():
        if not 0 <= h < n_heads:
            raise IndexFormatError(f"head {h} out of range: the model has heads 0..{n_heads - 1}")


def ingest(model, saes: dict, samples: list, out: Path, *, tokenizer=None, name: str = "custom", **options) -> Path:
    """Python API: index `samples` (token id lists, or strings when the model has a tokenizer)
    with a HookedTransformer and {layer: SAE} already in memory; `name` is recorded as the
    manifest's model. `options` are IngestConfig's fields."""
    if samples and isinstance(samples[0], str):
        from ..corpus import tokenize_samples

        tok = tokenizer if tokenizer is not None else model.tokenizer
        bos = tok.bos_token_id if tok.bos_token_id is not None else 0
        texts = list(samples)
        tokens = tokenize_samples(texts, tok, bos, min(options.get("max_tokens", 128), model.cfg.n_ctx))
    else:
        texts, tokens = None, [list(map(int, s)) for s in samples]
    cfg = IngestConfig(out=Path(out), model=name, **options)
    return run(cfg, Inputs.of(model, saes, tokens, texts, tokenizer, name=cfg.model))


def run(cfg: IngestConfig, inputs: Inputs | None = None) -> Path:
    import torch

    from ..core.decompose import Decomposer

    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    t0 = time.time()
    inp = inputs or load_inputs(cfg, device)
    model = inp.lm.model
    # the validation of the decomposition runs here, on the path users run
    decomposers = {layer: Decomposer(model, layer, inp.saes[layer]) for layer in inp.layers}
    check_heads(model, cfg.heads)
    if not inp.tokens:
        raise IndexFormatError("no samples to index")
    heads = tuple(cfg.heads) if cfg.heads else tuple(range(model.cfg.n_heads))
    identity = {"model": cfg.model, "sae": inp.sae_ids, "corpus": inp.corpus_hash}
    check_can_write(cfg.out, identity)
    manifest = Manifest(**identity, policy={**cfg.policy, "memory_budget_gb": cfg.memory_budget_gb},
                        layers=list(inp.layers), heads=list(heads), n_samples=len(inp.tokens), shard=cfg.shard)
    job = {**identity, "code_version": manifest.code_version, "policy": manifest.policy,
           "layers": manifest.layers, "heads": manifest.heads, "n_samples": manifest.n_samples, "shard": cfg.shard}
    writer = IndexWriter(cfg.out, job)
    stats = {}
    for layer in inp.layers:
        done = writer.layer_stats(layer)
        if done is not None:
            stats[str(layer)] = done
            continue
        writer.begin_layer(layer)
        t1 = time.time()
        with torch.no_grad():
            st = _ingest_layer(cfg, decomposers[layer], heads, inp, writer, device)
        st["seconds"] = time.time() - t1
        st["samples_per_s"] = len(inp.tokens) / st["seconds"]
        writer.finish_layer(layer, st)
        stats[str(layer)] = st
    _write_samples_and_features(inp, writer, stats)
    manifest = dataclasses.replace(manifest, stats=stats)
    out = writer.commit(manifest)
    if cfg.progress:
        print(f"index written to {out} in {time.time() - t0:.0f} s")
        for layer, st in stats.items():
            shares = [st[str(h)]["kept_abs_share"] for h in heads]
            print(f"  layer {layer}: {st['samples_per_s']:.2f} samples/s, {st['channels_kept']} channels kept of "
                  f"{st['channels_seen']} seen (min_count {cfg.min_count}), {st['sweeps']} sweep(s), "
                  f"{st['count_runs_spilled']} count run(s) spilled; rows carry {min(shares):.1%}-{max(shares):.1%} of |FA|")
    return out


def _ingest_layer(cfg: IngestConfig, dec, heads, inp: Inputs, writer: IndexWriter, device: str) -> dict:
    """Both passes of one layer; the layer's partitions are written through `writer`."""
    import numpy as np
    import torch
    from tqdm import tqdm

    from ..core.reduce import cooccurrence, induction_mask, reduce_sample
    from .channels import ChannelChunk, CountAggregator

    layer = dec.layer
    F = dec.sae.cfg.d_sae
    budget = int(cfg.memory_budget_gb * 1e9)
    order = sorted(range(len(inp.tokens)), key=lambda s: len(inp.tokens[s]))
    fires_F = torch.zeros(F, dtype=torch.long)
    bos_F = torch.zeros(F, dtype=torch.long)

    def samples(desc):
        for s in tqdm(order, desc=f"layer {layer}: {desc}", unit="sample", disable=not cfg.progress):
            yield s, torch.tensor(inp.tokens[s], device=device)

    # pass 1: exact counts (a quarter of the budget)
    counts = CountAggregator(budget // 4, writer.work_dir(layer) / "_count_runs")
    for _, toks in samples("count pass"):
        sparse = dec.encode(toks)
        idx, live = sparse.feat_idx_BTA[0], sparse.acts_BTA[0] != 0
        co = cooccurrence(idx, live)
        keys, n = co.channel_keys(F)
        counts.add(keys.cpu().numpy(), n.cpu().numpy())
        fires_F.index_add_(0, idx[live].cpu(), torch.ones(int(live.sum()), dtype=torch.long))
        bos_F.index_add_(0, idx[0][live[0]].cpu(), torch.ones(int(live[0].sum()), dtype=torch.long))
    n_runs = len(counts.runs)
    kept_keys, kept_counts, n_seen = counts.finish(cfg.min_count)
    del counts

    # pass 2: statistics, one sweep per chunk of kept channels (three quarters of the budget; the
    # count pass's quarter is free again, and the rows and pairs buffer takes an eighth)
    per_channel = ChannelChunk.bytes_per_channel(len(heads), cfg.examples_per_channel)
    chunk = max(1, (budget * 3 // 4) // per_channel)
    starts = list(range(0, len(kept_keys), chunk)) or [0]
    head_pos = torch.tensor(heads)
    tables = _RowsAndPairs(heads, writer, layer, flush_bytes=budget // 8)
    for c, lo in enumerate(starts):
        keys = torch.from_numpy(kept_keys[lo : lo + chunk])
        acc = ChannelChunk(keys, len(heads), cfg.examples_per_channel)
        first = c == 0
        for s, toks in samples(f"statistics sweep {c + 1}/{len(starts)}"):
            p = dec.prepare(toks)
            T = toks.shape[0]
            causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
            scores = p.hooks.model_scores_BHQK[0][head_pos].float()
            attn = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            ind = induction_mask(toks)
            red = reduce_sample(
                p.q.feat_BHTAE[0][head_pos], p.k.feat_BHTAE[0][head_pos], p.sparse.feat_idx_BTA[0],
                p.live_BTA[0], ind, attn, F, keys.to(device), cfg.top_keys, cfg.top_pairs, cfg.q_block,
                with_rows=first,
            )
            acc.add(red, inp.sample_ids[s])
            if first:
                tables.add(inp.sample_ids[s], p, red, ind, scores, causal, head_pos)
        for j, h in enumerate(heads):
            chan, ex = acc.tables(j, kept_counts[lo : lo + chunk], F)
            writer.write("channels", chan, layer, h, part=c)
            writer.write("examples", ex, layer, h, part=c)
        del acc
    tables.flush()

    stats = {str(h): {"rows": tables.n_rows[j],
                      "kept_abs_share": tables.kept_abs[j] / tables.ff_abs[j] if tables.ff_abs[j] else 0.0}
             for j, h in enumerate(heads)}
    stats.update({
        "feature_fires": fires_F.tolist(), "feature_bos": bos_F.tolist(), "channels_seen": n_seen,
        "channels_kept": int(len(kept_keys)), "count_runs_spilled": n_runs, "sweeps": len(starts),
        "kept_channels_per_sweep": int(min(chunk, max(len(kept_keys), 1))),
    })
    return stats


class _RowsAndPairs:
    """Buffers one layer's rows and pairs per head and writes them as part files whenever the
    buffer passes `flush_bytes`, so their memory does not grow with the corpus."""

    def __init__(self, heads, writer, layer, flush_bytes):
        import numpy as np

        self.heads, self.writer, self.layer, self.flush_bytes = heads, writer, layer, flush_bytes
        self.buf = {"rows": [], "pairs": []}
        self.nbytes, self.part = 0, 0
        self.n_rows = [0] * len(heads)
        self.kept_abs = np.zeros(len(heads))
        self.ff_abs = np.zeros(len(heads))

    def add(self, sample, p, red, ind, scores_HQK, causal, head_pos):
        import numpy as np
        import torch

        from ..core.decompose import TERM_NAMES, pair_terms

        qi, ki = torch.nonzero(causal, as_tuple=True)
        terms = pair_terms(p.q, p.k)[:, 0][:, head_pos]  # [C, H, Q, K]
        groups = {
            "f_bdec": ["feat_bdec"], "f_err": ["feat_err"], "bdec_f": ["bdec_feat"], "err_f": ["err_feat"],
            "resid_resid": ["bdec_bdec", "bdec_err", "err_bdec", "err_err"],
            "bias": [t for t in TERM_NAMES if "bias" in t],
        }
        n = len(qi)
        pairs = {
            "sample": np.full((len(self.heads), n), sample, np.int32),
            "q": np.broadcast_to(qi.cpu().numpy().astype(np.int16), (len(self.heads), n)),
            "k": np.broadcast_to(ki.cpu().numpy().astype(np.int16), (len(self.heads), n)),
            "induction": np.broadcast_to(ind[qi, ki].cpu().numpy(), (len(self.heads), n)),
            "score": scores_HQK[:, qi, ki].cpu().numpy(),
            "ff": red.ff_HQK[:, qi, ki].cpu().numpy(), "ff_abs": red.ff_abs_HQK[:, qi, ki].cpu().numpy(),
            "kept": red.kept_HQK[:, qi, ki].cpu().numpy(), "kept_abs": red.kept_abs_HQK[:, qi, ki].cpu().numpy(),
        }
        for name, members in groups.items():
            pairs[name] = terms[[TERM_NAMES.index(t) for t in members]].sum(0)[:, qi, ki].cpu().numpy()
        rq, rk = red.rows_q, red.rows_k
        rows = {"h": red.rows_h.cpu().numpy(), "sample": np.full(len(rq), sample, np.int32),
                "q": rq.cpu().numpy().astype(np.int16), "k": rk.cpu().numpy().astype(np.int16),
                "feat_q": red.rows_fq.cpu().numpy().astype(np.int32),
                "feat_k": red.rows_fk.cpu().numpy().astype(np.int32),
                "value": red.rows_val.cpu().numpy(), "induction": ind[rq, rk].cpu().numpy()}
        self.buf["pairs"].append(pairs)
        self.buf["rows"].append(rows)
        self.kept_abs += pairs["kept_abs"].sum(1)
        self.ff_abs += pairs["ff_abs"].sum(1)
        self.nbytes += sum(v.nbytes for v in pairs.values()) + sum(v.nbytes for v in rows.values())
        if self.nbytes > self.flush_bytes:
            self.flush()

    def flush(self):
        import numpy as np
        import pyarrow as pa

        if not self.buf["pairs"]:
            return
        for j, h in enumerate(self.heads):
            pairs = pa.table({c: np.concatenate([b[c][j] for b in self.buf["pairs"]]) for c in self.buf["pairs"][0]})
            self.writer.write("pairs", pairs.sort_by([("sample", "ascending"), ("q", "ascending"), ("k", "ascending")]),
                              self.layer, h, part=self.part)
            sel = [b["h"] == j for b in self.buf["rows"]]
            rows = pa.table({c: np.concatenate([b[c][m] for b, m in zip(self.buf["rows"], sel)])
                             for c in self.buf["rows"][0] if c != "h"})
            self.n_rows[j] += rows.num_rows
            self.writer.write("rows", rows.sort_by([("sample", "ascending"), ("q", "ascending"), ("k", "ascending")]),
                              self.layer, h, part=self.part)
        self.buf = {"rows": [], "pairs": []}
        self.nbytes = 0
        self.part += 1


def _write_samples_and_features(inp: Inputs, writer: IndexWriter, layer_stats: dict) -> None:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..registry import FeatureLabel

    lm, tokens = inp.lm, inp.tokens
    decode = lm.tokenizer.decode if lm.tokenizer is not None else (lambda ids: f"<{ids[0]}>")
    writer.write("samples", pa.table({
        "sample": pa.array(inp.sample_ids, pa.int32()), "text": inp.texts,
        "token_ids": pa.array(tokens, pa.list_(pa.int32())), "tokens": [[decode([t]) for t in ids] for ids in tokens],
        "n_tokens": pa.array([len(t) for t in tokens], pa.int16()),
    }))
    n_tok = sum(len(t) for t in tokens)
    frames = []
    for layer in inp.layers:
        st = layer_stats[str(layer)]
        fires, bos = st.pop("feature_fires"), st.pop("feature_bos")
        frames.append(pd.DataFrame({
            "layer": layer, "feature": range(len(fires)), "index_frequency": [f / n_tok for f in fires],
            "bos_rate": [b / len(tokens) for b in bos],
        }))
    df = pd.concat(frames)
    if inp.feature_table is not None and Path(inp.feature_table).exists():
        df = df.merge(pq.read_table(inp.feature_table).to_pandas(), on=["layer", "feature"], how="left")
    for col, empty in (("label", None), ("top_tokens", None), ("prev_token", None), ("frequency", None),
                       ("mean_act_when_active", None), ("max_act", None), ("top_contexts", None)):
        if col not in df:
            df[col] = empty
    punct = df["top_tokens"].apply(lambda ts: ts is not None and FeatureLabel(tuple(ts)).is_punctuation)
    df["punct_or_bos"] = punct | (df["bos_rate"] > 0.5)
    writer.write("features", pa.Table.from_pandas(df, preserve_index=False))

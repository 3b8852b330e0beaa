"""The explain pass: the exact split of the score at every stored example, every SAE activation,
and the q = k part of every channel.

`examples` names, per kept channel and head, the (sample, q, k) where the channel is strongest,
while `rows` covers only each query's most-attended keys, so most examples have no stored split.
This pass visits every indexed sample once per layer (`Decomposer.prepare`: one forward pass to
the layer, the SAE, and the per-token query / key vectors of every active feature; nothing dense
in d_sae is formed) and writes:

  example_terms  at each distinct example point (head, q, k): the FA block of the point (one
                 [A, A] matmul), its `explain_pairs` pairs of largest |FA|, the rest of the
                 feature x feature terms, the b_dec, error and bias groups (component dot
                 products) and the model's score. The parts sum to the score (`split_points`).
                 A channel's own FA at its example is `examples.value`; when it is not among
                 the stored pairs, it is smaller in |FA| than all of them (and part of ff_rest);
  activations    every nonzero SAE activation, for the feature pages;
  channel_diag   per kept channel, the count and FA sum of its q = k entries, so that views can
                 leave out each token's attention to itself (`diagonal_entries`).

It runs at the end of `fra ingest --engine local` (`--explain-pairs 0` skips it) and as
`fra explain --index OUT`: after `fra merge` for `--shard i/n` runs, and after `--engine ray`
runs (it runs in one process). The tables are staged in `OUT.explain-staging/` and renamed into
the index, replacing earlier ones; the manifest's policy then records `explain_pairs`. An
interrupted pass leaves the index as it was; run `fra explain` again.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from ..config import opt
from .schema import TABLES, IndexFormatError, Manifest, table_glob
from .store import MANIFEST_FILES, conform, record_files

GROUPS = ("ff_rest", "b_dec", "error", "bias")
KINDS = ("pair", *GROUPS, "score")
OUT_TABLES = ("example_terms", "activations", "channel_diag")
# component-pair terms (decompose.TERM_NAMES) per group; feat_feat is resolved into pairs + ff_rest
TERM_GROUPS = {
    "b_dec": ("feat_bdec", "bdec_feat", "bdec_bdec"),
    "error": ("feat_err", "err_feat", "err_err", "bdec_err", "err_bdec"),
    "bias": ("feat_bias", "bdec_bias", "err_bias", "bias_feat", "bias_bdec", "bias_err", "bias_bias"),
}
POINTS_PER_CHUNK = 1024  # example points whose [A, A] FA blocks are formed at once


@dataclass(frozen=True)
class ExplainConfig:
    index: Path = opt(Path("runs/demo"), "the index to explain (written by `fra ingest`, or `fra merge`)")
    model: str | None = opt(None, "the model the index was built with; default: the manifest's")
    sae: str | None = opt(
        None,
        "the --sae given to `fra ingest` (checked against the manifest's SAE identities); default: the preset's",
    )
    explain_pairs: int = opt(16, "feature pairs of largest |FA| stored at each example's (q, k)")
    device: str | None = opt(None, "torch device; default: cuda when available, else cpu")
    progress: bool = opt(True, "show progress bars and a summary")

    def __post_init__(self):
        if self.explain_pairs < 1:
            raise ValueError("--explain-pairs must be at least 1")


# --------------------------------------------------------------------------------------------
# The math: tensors in, tensors out


class PointSplit(NamedTuple):
    """The split of the score at P points (head, q, k) of one sample."""

    top_value_PN: object  # [P, N] FA of the N pairs of largest |FA|, largest first
    top_fq_PN: object  # [P, N] their query-side features
    top_fk_PN: object  # [P, N] their key-side features
    top_valid_PN: object  # [P, N] False past the point's number of pairs
    groups_PG: object  # [P, 4] float64: ff_rest, b_dec, error, bias (as GROUPS)
    score_P: object  # [P] the model's score


def _pair_keys(abs_PM, fq_PM, fk_PM, d_sae: int, slot_PM):
    """An int64 key per pair that orders by |FA| descending, then feat_q, then feat_k ascending
    (by slot when d_sae > 2^16, where a pair id does not fit in 32 bits); -1 for padding (|FA| -1).
    |FA| goes in the high 32 bits: a non-negative float32's bits order as it does."""
    import torch

    pid = fq_PM.long() * d_sae + fk_PM.long() if d_sae <= 1 << 16 else slot_PM
    key = (abs_PM.contiguous().view(torch.int32).long() << 32) | ((1 << 32) - 1 - pid)
    return torch.where(abs_PM >= 0, key, torch.full_like(key, -1))


def side_components(side):
    """[C, H, T, E]: the query- or key-side vectors of the four components (batch index 0)."""
    import torch

    from ..core.decompose import COMPONENTS

    return torch.stack([side.component(c)[0] for c in COMPONENTS])


def split_points(
    q, k, qc_CHTE, kc_CHTE, feat_idx_TA, live_TA, scores_HQK, h_P, q_P, k_P, n_top: int, d_sae: int
) -> PointSplit:
    """The split of the score at the points (h_P, q_P, k_P) of one sample (batch index 0 of the
    `SideVectors` q and k, whose components are qc_CHTE and kc_CHTE): the n_top feature pairs of
    largest |FA| (ties: smaller feat_q, then feat_k, first), the rest of the feature x feature
    terms, the b_dec, error and bias groups, and the model's score."""
    import torch

    from ..core.decompose import COMPONENTS

    fa_PAA = q.feat_BHTAE[0][h_P, q_P] @ k.feat_BHTAE[0][h_P, k_P].transpose(1, 2)
    P, A = fa_PAA.shape[:2]
    n = min(n_top, A * A)
    abs_PM = fa_PAA.abs().view(P, A * A)
    if not bool(live_TA.all()):  # padding slots (tokens with fewer than A features) rank last
        live_PAA = live_TA[q_P][:, :, None] & live_TA[k_P][:, None, :]
        abs_PM.masked_fill_(~live_PAA.view(P, A * A), -1.0)
    fq_PA, fk_PA = feat_idx_TA[q_P], feat_idx_TA[k_P]
    # topk's choice among pairs tied at the n-th |FA| is unspecified: a tie is there iff the
    # (n+1)-th largest equals the n-th, and those points are redone by key
    top_abs_PN, top_i_PN = abs_PM.topk(min(n + 1, A * A), dim=1)
    if top_abs_PN.shape[1] > n:
        tied_P = (top_abs_PN[:, n] == top_abs_PN[:, n - 1]) & (top_abs_PN[:, n] >= 0)
        top_i_PN = top_i_PN[:, :n].contiguous()
    else:
        tied_P = torch.zeros(P, dtype=torch.bool, device=fa_PAA.device)
    if bool(tied_P.any()):
        t = tied_P.nonzero()[:, 0]
        slot = torch.arange(A * A, device=fa_PAA.device).expand(len(t), -1)
        fq, fk = fq_PA[t].repeat_interleave(A, 1), fk_PA[t].repeat(1, A)
        top_i_PN[t] = _pair_keys(abs_PM[t], fq, fk, d_sae, slot).topk(n, dim=1).indices
    # the n chosen pairs in key order
    top_abs_PN = abs_PM.gather(1, top_i_PN)
    top_fq_PN, top_fk_PN = fq_PA.gather(1, top_i_PN // A), fk_PA.gather(1, top_i_PN % A)
    order_PN = _pair_keys(top_abs_PN, top_fq_PN, top_fk_PN, d_sae, top_i_PN).argsort(dim=1, descending=True)
    top_i_PN = top_i_PN.gather(1, order_PN)
    valid_PN = top_abs_PN.gather(1, order_PN) >= 0
    top_value_PN = fa_PAA.view(P, A * A).gather(1, top_i_PN)
    stored_P = torch.where(valid_PN, top_value_PN, torch.zeros_like(top_value_PN)).double().sum(1)
    # component dot products in float64; feat_feat (= the sum of every pair) minus the stored pairs is ff_rest
    dots = torch.einsum("ipe,jpe->ijp", qc_CHTE[:, h_P, q_P].double(), kc_CHTE[:, h_P, k_P].double())
    term = {f"{a}_{b}": dots[i, j] for i, a in enumerate(COMPONENTS) for j, b in enumerate(COMPONENTS)}
    groups_PG = torch.stack(
        [term["feat_feat"] - stored_P] + [sum(term[t] for t in TERM_GROUPS[g]) for g in GROUPS[1:]], dim=1
    )
    return PointSplit(
        top_value_PN,
        fq_PA.gather(1, top_i_PN // A),
        fk_PA.gather(1, top_i_PN % A),
        valid_PN,
        groups_PG,
        scores_HQK[h_P, q_P, k_P],
    )


def diagonal_entries(q, k, feat_idx_TA, live_TA, heads, d_sae: int):
    """Every q = k feature pair of one sample: channel keys (feat_q * d_sae + feat_k) [n] and
    FA[t, t, feat_q, feat_k] per head [len(heads), n]."""
    import torch

    h = torch.as_tensor(heads, device=feat_idx_TA.device)
    fa_HTAA = q.feat_BHTAE[0][h] @ k.feat_BHTAE[0][h].transpose(-1, -2)
    live_TAA = live_TA[:, :, None] & live_TA[:, None, :]
    keys_TAA = feat_idx_TA[:, :, None].long() * d_sae + feat_idx_TA[:, None, :].long()
    return keys_TAA[live_TAA], fa_HTAA[:, live_TAA]


# --------------------------------------------------------------------------------------------
# Accumulators and writers


class DiagSums:
    """Exact per-channel count and float64 sum of q = k entries over samples, for the kept
    channels only. Entries are added in sample order and reduced by channel (np.unique and
    bincount) whenever `limit` of them are pending, so memory follows the channels, not the corpus."""

    def __init__(self, kept_keys: np.ndarray, n_heads: int, limit: int = 1 << 21):
        self.kept, self.limit = np.asarray(kept_keys, np.int64), limit
        self.keys = np.zeros(0, np.int64)
        self.count = np.zeros(0, np.int64)
        self.sum_H = np.zeros((n_heads, 0))
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.n_pending = 0

    def add(self, keys: np.ndarray, vals_H: np.ndarray) -> None:
        if len(self.kept) == 0 or len(keys) == 0:
            return
        at = np.searchsorted(self.kept, keys).clip(max=len(self.kept) - 1)
        hit = self.kept[at] == keys
        self.pending.append((keys[hit], vals_H[:, hit].astype(np.float64)))
        self.n_pending += int(hit.sum())
        if self.n_pending >= self.limit:
            self.reduce()

    def reduce(self) -> None:
        if not self.pending:
            return
        keys = np.concatenate([self.keys, *[k for k, _ in self.pending]])
        ones = np.concatenate([self.count, *[np.ones(len(k), np.int64) for k, _ in self.pending]])
        vals = np.concatenate([self.sum_H, *[v for _, v in self.pending]], axis=1)
        self.keys, inv = np.unique(keys, return_inverse=True)
        self.count = np.bincount(inv, weights=ones, minlength=len(self.keys)).astype(np.int64)
        self.sum_H = np.stack([np.bincount(inv, weights=v, minlength=len(self.keys)) for v in vals])
        self.pending, self.n_pending = [], 0


class PartWriter:
    """One Parquet file of a table, written in row groups of up to `rows` rows."""

    def __init__(self, name: str, path: Path, rows: int = 1 << 20):
        self.name, self.path, self.rows = name, Path(path), rows
        self.buf: list[pa.Table] = []
        self.n, self.writer = 0, None

    def add(self, columns: dict) -> None:
        table = conform(self.name, pa.table(columns))
        if table.num_rows:
            self.buf.append(table)
            self.n += table.num_rows
        if self.n >= self.rows:
            self.flush()

    def flush(self) -> None:
        import pyarrow.parquet as pq

        if not self.buf:
            return
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, TABLES[self.name].schema, compression="zstd")
        self.writer.write_table(pa.concat_tables(self.buf), row_group_size=self.rows)
        self.buf, self.n = [], 0

    def close(self) -> None:
        """Flush; a writer that got no rows still writes its (empty) file, so that every
        partition of the index exists."""
        import pyarrow.parquet as pq

        self.flush()
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.path, TABLES[self.name].schema, compression="zstd")
        self.writer.close()


def _kind_column(codes: np.ndarray) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(KINDS)).cast(pa.string())


def _term_rows(sample: int, pts: np.ndarray, sp: PointSplit) -> dict:
    """example_terms rows of one chunk of points (pts: [P, 3] head, q, k), with their head: per
    point the pairs by rank, then the groups and the score."""
    valid = sp.top_valid_PN.cpu().numpy()
    P, N = valid.shape
    n_groups = len(KINDS) - 1
    groups = np.concatenate([sp.groups_PG.cpu().numpy(), sp.score_P.double().cpu().numpy()[:, None]], axis=1)
    # a [P, N + n_groups] grid of rows, then the padding pairs (fewer live pairs than N) dropped
    keep = np.concatenate([valid, np.ones((P, n_groups), bool)], axis=1).reshape(-1)
    none = np.full((P, n_groups), -1)
    grid = {
        "rank": np.concatenate([np.broadcast_to(np.arange(N), (P, N)), none], axis=1),
        "kind": np.concatenate(
            [np.zeros((P, N), np.int8), np.broadcast_to(np.arange(1, len(KINDS), dtype=np.int8), (P, n_groups))], axis=1
        ),
        "feat_q": np.concatenate([sp.top_fq_PN.cpu().numpy(), none], axis=1),
        "feat_k": np.concatenate([sp.top_fk_PN.cpu().numpy(), none], axis=1),
        "value": np.concatenate([sp.top_value_PN.cpu().numpy(), groups], axis=1),
    }
    point = np.repeat(np.arange(P), N + n_groups)[keep]
    return {
        "head": pts[point, 0],
        "sample": np.full(len(point), sample, np.int32),
        "q": pts[point, 1].astype(np.int16),
        "k": pts[point, 2].astype(np.int16),
        "rank": grid["rank"].reshape(-1)[keep].astype(np.int16),
        "kind": grid["kind"].reshape(-1)[keep],
        "feat_q": grid["feat_q"].reshape(-1)[keep].astype(np.int32),
        "feat_k": grid["feat_k"].reshape(-1)[keep].astype(np.int32),
        "value": grid["value"].reshape(-1)[keep].astype(np.float32),
    }


# --------------------------------------------------------------------------------------------
# The pass


def _example_points(con, root: Path, layer: int, batch_rows: int = 1 << 16):
    """The layer's distinct example points, streamed in sample order: yields (sample, [P, 3] int64
    array of head, q, k sorted). DuckDB spills the distinct and the sort past its memory limit."""
    reader = con.sql(
        "SELECT DISTINCT sample, head::INTEGER AS head, q, k FROM read_parquet(?, hive_partitioning = true) "
        "WHERE layer = ? ORDER BY sample, head, q, k",
        params=[table_glob(root, "examples"), layer],
    ).to_arrow_reader(batch_rows)
    held = None
    for batch in reader:
        cols = np.stack([batch.column(c).to_numpy().astype(np.int64) for c in ("sample", "head", "q", "k")], axis=1)
        if held is not None:
            cols = np.concatenate([held, cols])
        cut = np.flatnonzero(np.diff(cols[:, 0])) + 1
        parts = np.split(cols, cut)
        for part in parts[:-1]:
            yield int(part[0, 0]), part[:, 1:]
        held = parts[-1]
    if held is not None and len(held):
        yield int(held[0, 0]), held[:, 1:]


def _kept_keys(con, root: Path, layer: int, d_sae: int) -> np.ndarray:
    return np.asarray(
        con.execute(
            "SELECT DISTINCT feat_q::BIGINT * ? + feat_k AS key FROM read_parquet(?, hive_partitioning = true) "
            "WHERE layer = ? ORDER BY key",
            [d_sae, table_glob(root, "channels"), layer],
        ).fetchnumpy()["key"],
        np.int64,
    )


def explain_layer(dec, heads, samples: pa.Table, points, kept: np.ndarray, n_top: int, staging: Path, progress):
    """Write one layer's example_terms, activations and channel_diag under `staging`."""
    import torch
    from tqdm import tqdm

    layer, F = dec.layer, int(dec.sae.cfg.d_sae)
    device = dec.proj.dec_q_FHE.device
    terms = {
        h: PartWriter("example_terms", staging / "example_terms" / f"layer={layer}" / f"head={h}" / "part-0.parquet")
        for h in heads
    }
    acts = PartWriter("activations", staging / "activations" / f"layer={layer}" / "part-0.parquet")
    diag = DiagSums(kept, len(heads))
    ids = samples["sample"].to_numpy()
    n_points, pending = 0, next(points, None)
    for sample, token_ids in tqdm(
        zip(ids, samples["token_ids"].to_pylist()), total=len(ids), desc=f"layer {layer}: explain", disable=not progress
    ):
        p = dec.prepare(torch.tensor(token_ids, device=device))
        feat_idx_TA, live_TA = p.sparse.feat_idx_BTA[0], p.live_BTA[0]
        pos, slot = torch.nonzero(live_TA, as_tuple=True)
        feat = feat_idx_TA[pos, slot]
        order = np.lexsort((feat.cpu().numpy(), pos.cpu().numpy()))
        acts.add(
            {
                "sample": np.full(len(order), sample, np.int32),
                "pos": pos.cpu().numpy()[order].astype(np.int16),
                "feat": feat.cpu().numpy()[order].astype(np.int32),
                "act": p.sparse.acts_BTA[0][pos, slot].float().cpu().numpy()[order],
            }
        )
        keys, vals_H = diagonal_entries(p.q, p.k, feat_idx_TA, live_TA, heads, F)
        diag.add(keys.cpu().numpy(), vals_H.float().cpu().numpy())

        if pending is None or pending[0] != sample:
            continue
        pts, pending = pending[1], next(points, None)
        n_points += len(pts)
        scores_HQK = p.hooks.model_scores_BHQK[0].to(dec.dtype)
        qc_CHTE, kc_CHTE = side_components(p.q), side_components(p.k)
        for c0 in range(0, len(pts), POINTS_PER_CHUNK):
            chunk = torch.from_numpy(pts[c0 : c0 + POINTS_PER_CHUNK]).to(device)
            h_P, q_P, k_P = chunk[:, 0], chunk[:, 1], chunk[:, 2]
            sp = split_points(p.q, p.k, qc_CHTE, kc_CHTE, feat_idx_TA, live_TA, scores_HQK, h_P, q_P, k_P, n_top, F)
            cols = _term_rows(int(sample), pts[c0 : c0 + POINTS_PER_CHUNK], sp)
            head = cols.pop("head")
            for h in np.unique(head):
                m = head == h
                terms[int(h)].add({c: (_kind_column(v[m]) if c == "kind" else v[m]) for c, v in cols.items()})
    if pending is not None:
        raise IndexFormatError(f"layer {layer}: examples name sample {pending[0]}, which the samples table lacks")
    for w in [*terms.values(), acts]:
        w.close()
    diag.reduce()
    for j, h in enumerate(heads):
        w = PartWriter("channel_diag", staging / "channel_diag" / f"layer={layer}" / f"head={h}" / "part-0.parquet")
        w.add(
            {
                "feat_q": (diag.keys // F).astype(np.int32),
                "feat_k": (diag.keys % F).astype(np.int32),
                "count": diag.count,
                "sum": diag.sum_H[j] if len(diag.keys) else np.zeros(0),
            }
        )
        w.close()
    return {"points": n_points, "diag_channels": int(len(diag.keys))}


def explain_index(index: Path, model, saes: dict, explain_pairs: int = 16, progress: bool = True) -> dict:
    """Python API: add example_terms, activations and channel_diag to the index at `index`, with the
    HookedTransformer and {layer: SAE} it was built with (not checked here; `run` checks the
    SAEs' identities). Replaces these tables if present; returns per-layer counts."""
    import duckdb
    import pyarrow.parquet as pq
    import torch

    from ..core.decompose import Decomposer

    if explain_pairs < 1:
        raise ValueError("explain_pairs must be at least 1")
    root = Path(index)
    man = Manifest.read(root)
    missing = [layer for layer in man.layers if layer not in saes]
    if missing:
        raise IndexFormatError(f"no SAE given for layer(s) {missing} of the index {root}")
    samples = pq.read_table(root / "samples", columns=["sample", "token_ids"]).sort_by("sample")
    staging = root.with_name(root.name + ".explain-staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    con = duckdb.connect()
    con.execute("SET memory_limit = '1GB'")
    con.execute("SET temp_directory = ?", [str(staging / "_duckdb")])
    t0, stats = time.time(), {}
    with torch.no_grad():
        for layer in man.layers:
            dec = Decomposer(model, layer, saes[layer])
            kept = _kept_keys(con, root, layer, int(dec.sae.cfg.d_sae))
            points = _example_points(con, root, layer)
            stats[str(layer)] = explain_layer(dec, man.heads, samples, points, kept, explain_pairs, staging, progress)
    con.close()
    for name in OUT_TABLES:  # into place, replacing an earlier pass's tables
        old = staging / f"{name}.old"
        if (root / name).exists():
            os.replace(root / name, old)
        if (staging / name).exists():
            os.replace(staging / name, root / name)
    # the manifest vouches for the files as they are now (open_index refuses unrecorded ones)
    policy = {**man.policy, "explain_pairs": explain_pairs}
    dataclasses.replace(man, policy=policy, files=record_files(root, skip=MANIFEST_FILES)).write(root)
    shutil.rmtree(staging)
    if progress:
        per = ", ".join(f"layer {l}: {s['points']} example points" for l, s in stats.items())
        print(f"explained {root} in {time.time() - t0:.0f} s ({per})")
    return stats


def run(cfg: ExplainConfig) -> dict:
    """`fra explain`: load the index's model and SAEs by name, check them against the manifest, explain."""
    import torch

    from ..registry import load_model, sae_source

    man = Manifest.read(cfg.index)
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_name = cfg.model or man.model
    source = sae_source(model_name, cfg.sae)
    saes = {}
    for layer in man.layers:
        saes[layer], identity = source.load(layer, device)
        if identity != man.sae[str(layer)]:
            raise IndexFormatError(
                f"the layer-{layer} SAE {identity} is not the one the index {cfg.index} was built with "
                f"({man.sae[str(layer)]}); pass the --sae given to `fra ingest`"
            )
    lm = load_model(model_name, device=device)
    return explain_index(cfg.index, lm.model, saes, cfg.explain_pairs, cfg.progress)

"""Work units of `fra ingest`: blocks of samples, each turned into a partial result on disk.

Why blocks. An index must not depend on who computed it: one process, Ray actors, or Slurm
shards. Integer counts add up the same in any order, but float64 sums of float32 terms do not,
so the work is cut into a fixed plan in which no float addition depends on the schedule:

- a *block* is `policy.block_size` consecutive samples of the job's sample list (block b holds
  positions [b * block_size, (b + 1) * block_size));
- one block is always computed by the same code (`BlockWorker`), sample by sample in list order,
  into a *partial*: a directory of Parquet files under `<out>.staging/partials/`, written under
  a temporary name and renamed, so a partial that exists is a finished block. Its `files.json`
  records each file's sha256 and row count; `verify` checks them before a partial is merged,
  and a partial that fails is removed and computed again;
- `merge.py` adds the partials of all blocks exactly (integers, and float64 sums in 128-bit
  fixed point), so in any order (the one merge, used by every engine and by `fra merge`).

So the engine only decides where and when blocks run: the same policy gives the same index,
bit for bit, from any engine, in any schedule, after any number of retries or resumes.

Per layer, two passes, each a set of block tasks:

  count: `partials/layer=L/count/block=B/`: the block's exact channel counts (`counts.parquet`,
         via `channels.CountAggregator`, spilling past its budget), how often each feature
         fires (`features.parquet`), and `stats.json`. `merge.select_channels` then sums the
         counts of all blocks and keeps channels with count >= min_count (`kept.parquet`).
  stats: `partials/layer=L/stats/block=B/`: for the kept channels the block touches (known from
         its count partial, so its accumulators are bounded by the block, not the corpus), the
         float64 sums (rounded to the merge's fixed point) and the block's top examples per head
         (`channels/head=H/`, `examples/head=H/`, a part per sweep of chunks that fit the memory
         budget), and the block's rows and pairs (`rows/head=H/`, `pairs/head=H/`), all in the
         index's schema.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from .job import Job
from .store import check_files, conform, record_files, write_parquet

PHASES = ("count", "stats")
RECORD = "files.json"  # a partial's file record: {path: {sha256, bytes, rows}}


@dataclass(frozen=True)
class Task:
    """One block of one pass of one layer."""

    phase: str  # "count" or "stats"
    layer: int
    block: int

    @property
    def name(self) -> str:
        return f"{self.phase}:{self.layer}:{self.block}"


def tasks(job: Job, phase: str, layer: int) -> list[Task]:
    return [Task(phase, layer, b) for b in range(job.n_blocks)]


def block_positions(block: int, block_size: int, n_samples: int) -> range:
    return range(block * block_size, min((block + 1) * block_size, n_samples))


def layer_dir(partials: Path, layer: int) -> Path:
    return Path(partials) / f"layer={layer}"


def partial_dir(partials: Path, task: Task) -> Path:
    return layer_dir(partials, task.layer) / task.phase / f"block={task.block:06d}"


def kept_path(partials: Path, layer: int) -> Path:
    return layer_dir(partials, layer) / "kept.parquet"


def missing(partials: Path, tasks: list[Task]) -> list[Task]:
    """The tasks whose partial is not there yet (a partial without its file record is not one)."""
    return [t for t in tasks if not (partial_dir(partials, t) / RECORD).exists()]


def verify(partials: Path, tasks: list[Task]) -> list[tuple[Task, str]]:
    """Check the finished partials of `tasks` against their file records (sha256, size, rows).
    Each that fails is removed, so that it is computed again; returns them with the reason."""
    bad = []
    for t in tasks:
        d = partial_dir(partials, t)
        if not (d / RECORD).exists():
            continue
        try:
            why = check_files(d, json.loads((d / RECORD).read_text()), full=True, skip=(RECORD,))
        except ValueError as exc:
            why = f"{d / RECORD} is unreadable ({exc})"
        if why is not None:
            shutil.rmtree(d)
            bad.append((t, why))
    return bad


def describe(bad: list[tuple[Task, str]]) -> str:
    return "; ".join(f"layer {t.layer} {t.phase} block {t.block}: {why}" for t, why in bad)


class BlockWorker:
    """Runs block tasks of one job: what the local engine, each Ray actor and each Slurm shard
    call. Holds the model, the SAEs (validated by `Decomposer`) and the samples."""

    def __init__(self, job: Job, inp, device: str, partials: Path, q_block: int = 32, progress: bool = False):
        from ..core.decompose import Decomposer

        self.job, self.inp, self.device, self.partials = job, inp, device, Path(partials)
        self.cfg = job.policy  # the policy options, by the name the inner loop reads them
        self.q_block, self.progress = q_block, progress
        self.decomposers = {layer: Decomposer(inp.lm.model, layer, inp.saes[layer]) for layer in job.layers}
        self.heads = job.heads
        self.budget = job.budget
        # each sample's forward pass, once for every layer, kept from the count pass for the statistics pass
        self._forward = SharedForward(inp.lm.model, self.decomposers, self.budget.forward_bytes * len(job.layers))
        self._kept = {}  # {layer: its kept keys, ascending}, for the layer being computed

    def run(self, task: Task) -> None:
        """Compute the task's partial, unless it exists (then nothing happens)."""
        import torch

        dest = partial_dir(self.partials, task)
        if (dest / RECORD).exists():
            return
        if dest.exists():  # not a finished partial: no file record
            shutil.rmtree(dest)
        tmp = dest.with_name(f"{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir(parents=True)
        t0 = time.time()
        with torch.no_grad():
            stats = (self._count if task.phase == "count" else self._stats)(task, tmp)
        stats["seconds"] = time.time() - t0
        if task.phase == "stats":  # the last pass over these samples at this layer
            self._forward.drop(task.layer, [self.inp.tokens[s] for s in self._positions(task.block)])
        (tmp / "stats.json").write_text(json.dumps(stats))
        (tmp / RECORD).write_text(json.dumps(record_files(tmp, skip=(RECORD,))))
        try:
            os.replace(tmp, dest)
        except OSError:  # another worker finished the same block first: its partial is identical
            shutil.rmtree(tmp)

    def _positions(self, block: int) -> range:
        return block_positions(block, self.job.policy.block_size, len(self.inp.tokens))

    def _samples(self, block: int, desc: str = ""):
        import torch
        from tqdm import tqdm

        positions = self._positions(block)
        bar = tqdm(positions, desc=f"  block {block} {desc}", unit="sample", leave=False, disable=not self.progress)
        for s in bar:
            yield s, torch.tensor(self.inp.tokens[s], device=self.device)

    def _count(self, task: Task, tmp: Path) -> dict:
        import torch

        from ..core.reduce import cooccurrence
        from .channels import CountAggregator

        dec = self.decomposers[task.layer]
        F = dec.sae.cfg.d_sae
        fires_F = torch.zeros(F, dtype=torch.long)
        bos_F = torch.zeros(F, dtype=torch.long)
        counts = CountAggregator(self.budget.count_bytes, tmp / "_count_runs", n_keys=F * F)
        window = getattr(dec, "sliding_window", None)  # None: full causal attention
        for _, toks in self._samples(task.block, "count"):
            sparse = dec.encode(toks)
            idx, live = sparse.feat_idx_BTA[0], sparse.acts_BTA[0] != 0
            keys, n = cooccurrence(idx, live, window).channel_keys(F)
            counts.add(keys.cpu().numpy(), n.cpu().numpy())
            fires_F.index_add_(0, idx[live].cpu(), torch.ones(int(live.sum()), dtype=torch.long))
            bos_F.index_add_(0, idx[0][live[0]].cpu(), torch.ones(int(live[0].sum()), dtype=torch.long))
        n_runs = len(counts.runs)
        keys, n = counts.finish()
        write_parquet(pa.table({"key": keys, "count": n}), tmp / "counts.parquet")
        fired = torch.nonzero(fires_F)[:, 0]
        write_parquet(
            pa.table({"feature": fired.numpy(), "fires": fires_F[fired].numpy(), "bos": bos_F[fired].numpy()}),
            tmp / "features.parquet",
        )
        return {"count_runs_spilled": n_runs}

    def _kept_of(self, layer: int) -> np.ndarray:
        if layer not in self._kept:
            import pyarrow.parquet as pq

            self._kept = {layer: pq.read_table(kept_path(self.partials, layer))["key"].to_numpy()}
        return self._kept[layer]

    def _stats(self, task: Task, tmp: Path) -> dict:
        import pyarrow.parquet as pq
        import torch

        from ..core.reduce import ReduceOptions, SampleFA, reduce_sample
        from .channels import ChannelChunk

        cfg, heads, layer = self.cfg, self.heads, task.layer
        dec = self.decomposers[layer]
        F = dec.sae.cfg.d_sae
        # the kept channels this block touches, with their counts in the block
        mine = pq.read_table(partial_dir(self.partials, Task("count", layer, task.block)) / "counts.parquet")
        block_keys, block_counts = mine["key"].to_numpy(), mine["count"].to_numpy()
        touched = np.isin(block_keys, self._kept_of(layer), assume_unique=True)
        block_keys, block_counts = block_keys[touched], block_counts[touched]

        per_channel = ChannelChunk.bytes_per_channel(len(heads), cfg.examples_per_channel)
        chunk = self.budget.channels_per_sweep(per_channel)
        starts = list(range(0, len(block_keys), chunk)) or [0]
        head_pos = torch.tensor(heads)
        tables = RowsAndPairs(heads, tmp, flush_bytes=self.budget.flush_bytes)
        opts = ReduceOptions(cfg.top_keys, cfg.top_pairs, self.q_block)
        window = getattr(dec, "sliding_window", None)  # None: full causal attention
        # Each value is formed in one sweep only: sweep c forms the query features of its chunk's
        # channels and adds their |FA| totals, and the features of no kept channel go with the
        # chunk their keys would sort into. The per-(h, q, k) totals are then complete after the
        # last sweep, which writes the rows and pairs; where keeping them until then would pass
        # the flush share of the budget, the first sweep forms every value instead.
        positions = self._positions(task.block)
        T = max(len(self.inp.tokens[s]) for s in positions)
        split = len(starts) > 1 and len(positions) * len(heads) * T * T * 4 <= self.budget.flush_bytes
        first_key = np.searchsorted(block_keys, np.arange(F, dtype=np.int64) * F)
        abs_sweep = np.searchsorted(np.asarray(starts), first_key, side="right") - 1 if split else np.zeros(F, int)
        rows_sweep = len(starts) - 1 if split else 0
        ff_abs_before = {}  # sample position -> the |FA| totals of the earlier sweeps
        for c, lo in enumerate(starts):
            keys = torch.from_numpy(block_keys[lo : lo + chunk])
            acc = ChannelChunk(keys, len(heads), cfg.examples_per_channel)
            abs_features = torch.from_numpy(abs_sweep == c).to(self.device)
            for s, toks in self._samples(task.block, f"statistics, sweep {c + 1}/{len(starts)}"):
                p = dec.prepare(toks)
                x = SampleFA.of(p, head_pos, window)
                red = reduce_sample(x, F, keys.to(self.device), replace(opts, with_rows=c == rows_sweep), abs_features)
                acc.add(red.slots, self.inp.sample_ids[s])
                if c == rows_sweep:
                    before = ff_abs_before.pop(s, None)
                    if before is not None:
                        red = replace(red, totals=replace(red.totals, ff_abs_HQK=red.totals.ff_abs_HQK + before))
                    tables.add(self.inp.sample_ids[s], p, red, x)
                elif red.ff_abs_HQK is not None:
                    ff_abs_before[s] = ff_abs_before.get(s, 0) + red.ff_abs_HQK
            # in the index's own schema, one part per sweep and head (sorted by channel, as the
            # sweeps are), so that the merge of a single block only moves the files
            for j, h in enumerate(heads):
                chan, ex = acc.tables(j, block_counts[lo : lo + chunk], F)
                write_parquet(
                    conform("channels", fixed_point(chan)), tmp / "channels" / f"head={h}" / f"part-{c:05d}.parquet"
                )
                write_parquet(conform("examples", ex), tmp / "examples" / f"head={h}" / f"part-{c:05d}.parquet")
            del acc
        tables.flush()
        return {
            "sweeps": len(starts),
            "kept_channels_per_sweep": int(min(chunk, max(len(block_keys), 1))),
            "rows": tables.n_rows,
            "kept_abs": tables.kept_abs.tolist(),
            "ff_abs": tables.ff_abs.tolist(),
        }


class SharedForward:
    """Each sample's forward pass, run once for every layer of the job (`run_hooks_layers`, up to
    the last layer) and kept for the later passes over the same sample while it fits in
    `budget_bytes` (about 1 MB per sample of 128 tokens and layer: the hook values, and the SAE
    activations kept sparse once a layer has encoded them). It stands in for each decomposer's
    own `_forward`, so every caller gets the tensors the decomposer would compute."""

    def __init__(self, model, decomposers: dict, budget_bytes: int):
        self.model, self.decs, self.budget, self.nbytes = model, decomposers, budget_bytes, 0
        self.memo: dict[bytes, dict[int, list]] = {}  # tokens -> {layer: [tokens_BT, hooks, sparse acts | None]}
        for layer, dec in decomposers.items():
            dec._forward = lambda tokens, layer=layer: self(layer, tokens)

    def __call__(self, layer: int, tokens):
        from ..core.decompose import run_hooks_layers, validate_tokens

        dec = self.decs[layer]
        key = self._key(tokens)
        entry = self.memo.get(key, {}).get(layer)
        if entry is None:
            tokens_BT = tokens[None] if tokens.ndim == 1 else tokens
            validate_tokens(self.model, tokens_BT)
            names = {lay: d.sae.cfg.metadata.hook_name for lay, d in self.decs.items()}
            hooks = run_hooks_layers(self.model, names, tokens_BT)
            entries = {lay: [tokens_BT, h, None] for lay, h in hooks.items()}
            size = sum(_nbytes(vars(h).values()) for h in hooks.values())
            if self.nbytes + size <= self.budget:
                self.memo[key] = entries
                self.nbytes += size
            entry = entries[layer]
        tokens_BT, hooks, sparse = entry
        if sparse is not None:
            return tokens_BT, hooks, sparse.to_dense()
        acts = dec.encode_hooks(hooks)
        if key in self.memo:
            entry[2] = acts.to_sparse()
            self.nbytes += _nbytes((entry[2].values(), entry[2].indices()))
        return tokens_BT, hooks, acts

    @staticmethod
    def _key(tokens) -> bytes:
        return tokens.cpu().numpy().tobytes()

    def drop(self, layer: int, samples) -> None:
        """Forget `layer`'s part of the given samples' passes (token lists)."""
        import torch

        for tokens in samples:
            key = self._key(torch.tensor(tokens))
            entries = self.memo.get(key)
            if entries is None or layer not in entries:
                continue
            _, hooks, sparse = entries.pop(layer)
            self.nbytes -= _nbytes(vars(hooks).values())
            if sparse is not None:
                self.nbytes -= _nbytes((sparse.values(), sparse.indices()))
            if not entries:
                del self.memo[key]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))


# The float64 sums of a block are rounded to units of 2^-60 (as np.rint and DuckDB's cast to
# HUGEINT both do: to nearest, ties to even), in which the merge adds blocks exactly
FIXED_POINT = 2.0**60
SUM_COLUMNS = ("sum", "sumsq", "ind_sum", "ind_sumsq")


def fixed_point(table: pa.Table) -> pa.Table:
    for name in SUM_COLUMNS:
        i = table.schema.get_field_index(name)
        x = table.column(name).to_numpy()
        table = table.set_column(i, name, pa.array(np.rint(x * FIXED_POINT) / FIXED_POINT))
    return table


class RowsAndPairs:
    """Buffers one block's rows and pairs per head and writes them as part files (in the index's
    schema, under `root/rows/head=H/`) whenever the buffer passes `flush_bytes`."""

    def __init__(self, heads, root: Path, flush_bytes: int):
        self.heads, self.root, self.flush_bytes = heads, Path(root), flush_bytes
        self.buf = {"rows": [], "pairs": []}
        self.nbytes, self.part = 0, 0
        self.n_rows = [0] * len(heads)
        self.kept_abs = np.zeros(len(heads))
        self.ff_abs = np.zeros(len(heads))

    def add(self, sample, p, red, x):
        """One sample's pairs (every visible (q, k)) and rows; `p` is its `Prepared`, `red` its
        `SampleReduction`, `x` its `SampleFA`."""
        import torch

        from ..core.decompose import TERM_NAMES, pair_terms

        qi, ki = torch.nonzero(x.visible_QK, as_tuple=True)
        head_pos = torch.tensor(self.heads, device=qi.device)
        terms = pair_terms(p.q, p.k)[:, 0][:, head_pos]  # [C, H, Q, K]
        groups = {
            "f_bdec": ["feat_bdec"],
            "f_err": ["feat_err"],
            "bdec_f": ["bdec_feat"],
            "err_f": ["err_feat"],
            "resid_resid": ["bdec_bdec", "bdec_err", "err_bdec", "err_err"],
            "bias": [t for t in TERM_NAMES if "bias" in t],
        }
        n = len(qi)
        tot = red.totals
        pairs = {
            "sample": np.full((len(self.heads), n), sample, np.int32),
            "q": np.broadcast_to(qi.cpu().numpy().astype(np.int16), (len(self.heads), n)),
            "k": np.broadcast_to(ki.cpu().numpy().astype(np.int16), (len(self.heads), n)),
            "induction": np.broadcast_to(x.ind_QK[qi, ki].cpu().numpy(), (len(self.heads), n)),
            "score": x.scores_HQK[:, qi, ki].cpu().numpy(),
            "ff": tot.ff_HQK[:, qi, ki].cpu().numpy(),
            "ff_abs": tot.ff_abs_HQK[:, qi, ki].cpu().numpy(),
            "kept": tot.kept_HQK[:, qi, ki].cpu().numpy(),
            "kept_abs": tot.kept_abs_HQK[:, qi, ki].cpu().numpy(),
        }
        for name, members in groups.items():
            pairs[name] = terms[[TERM_NAMES.index(t) for t in members]].sum(0)[:, qi, ki].cpu().numpy()
        r = red.rows
        rows = {
            "h": r.h.cpu().numpy(),
            "sample": np.full(len(r.q), sample, np.int32),
            "q": r.q.cpu().numpy().astype(np.int16),
            "k": r.k.cpu().numpy().astype(np.int16),
            "feat_q": r.feat_q.cpu().numpy().astype(np.int32),
            "feat_k": r.feat_k.cpu().numpy().astype(np.int32),
            "value": r.value.cpu().numpy(),
            "induction": x.ind_QK[r.q, r.k].cpu().numpy(),
        }
        self.buf["pairs"].append(pairs)
        self.buf["rows"].append(rows)
        self.kept_abs += pairs["kept_abs"].sum(1)
        self.ff_abs += pairs["ff_abs"].sum(1)
        self.nbytes += sum(v.nbytes for v in pairs.values()) + sum(v.nbytes for v in rows.values())
        if self.nbytes > self.flush_bytes:
            self.flush()

    def flush(self):
        if not self.buf["pairs"]:
            return
        order = [("sample", "ascending"), ("q", "ascending"), ("k", "ascending")]
        for j, h in enumerate(self.heads):
            pairs = pa.table({c: np.concatenate([b[c][j] for b in self.buf["pairs"]]) for c in self.buf["pairs"][0]})
            write_parquet(
                conform("pairs", pairs.sort_by(order)),
                self.root / "pairs" / f"head={h}" / f"part-{self.part:05d}.parquet",
            )
            sel = [b["h"] == j for b in self.buf["rows"]]
            rows = pa.table(
                {
                    c: np.concatenate([b[c][m] for b, m in zip(self.buf["rows"], sel)])
                    for c in self.buf["rows"][0]
                    if c != "h"
                }
            )
            self.n_rows[j] += rows.num_rows
            write_parquet(
                conform("rows", rows.sort_by(order)), self.root / "rows" / f"head={h}" / f"part-{self.part:05d}.parquet"
            )
        self.buf = {"rows": [], "pairs": []}
        self.nbytes = 0
        self.part += 1

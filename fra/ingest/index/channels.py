"""Channel statistics whose memory is set by a budget, not by d_sae^2 or the corpus size.

The keep-policy is decided from exact quantities, in two passes over a layer, each run block
by block of samples (`blocks.py`; `merge.py` combines the blocks):

1. Counts. A channel's count does not depend on the head or on any FA value: each sample's
   exact co-activation counts (`reduce.cooccurrence`) go into a `CountAggregator`, an
   in-memory buffer of (key, count) that is combined (sorted and summed by key) when it
   outgrows its share of the budget, and written as a run to Parquet when combining no longer
   makes it fit. At the end of the block the runs are summed out of core by DuckDB
   (memory_limit = the same share, spilling to disk), which gives the same counts as an
   all-in-memory sum. The blocks' counts are summed, and channels with count >= min_count kept.
2. Statistics. The kept keys a block touches are cut into chunks whose accumulators
   (`ChannelChunk`) fit the budget; each chunk is one sweep over the block (usually there is
   one chunk). Per channel and head it holds the sum and sum of squares (float64), the same on
   induction targets, and the top examples: the strongest entry of each sample, of which the
   largest `examples_per_channel` are kept.

Channel keys are feat_q * d_sae + feat_k (int64), so sorted keys are sorted (feat_q, feat_k).

Where the heads share work: the count is head-independent and is computed once (pass 1).
Without RoPE a channel's per-head sum also factorises (a weight-only coefficient per head times
a head-independent co-activation sum), and with RoPE it does per rotary frequency; but the sum
of squares and the examples do not factorise, so pass 2 still forms the values per head, and
the factorised sums would only save the cheapest of its reductions.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from ..core.reduce import POS_SHIFT, SlotStats

COUNT_ROW_BYTES = 16  # an int64 key and an int64 count
DENSE_MIN_KEYS = 2**16


class CountAggregator:
    """Exact (key -> summed count) over a corpus, in at most `budget_bytes` of memory.

    When every key lies in [0, n_keys) and a dense int64 counter of n_keys fits the budget (d_sae
    4,096: 134 MB), counts are added into it in place: no sorting, nothing spilled. Otherwise
    (wide SAEs), and for key spaces under DENSE_MIN_KEYS, where sorting is cheap anyway, the
    (key, count) buffer below is combined and spilled as described above."""

    def __init__(self, budget_bytes: int, spill_dir: Path, n_keys: int | None = None):
        # combining needs the buffer plus its sorted copy, so the buffer gets a third of the share
        self.max_rows = max(budget_bytes // (3 * COUNT_ROW_BYTES), 16)
        self.spill_dir = Path(spill_dir)
        self.keys: list[np.ndarray] = []
        self.counts: list[np.ndarray] = []
        self.n_rows = 0
        self.runs: list[Path] = []
        self.budget_bytes = budget_bytes
        dense = n_keys is not None and DENSE_MIN_KEYS <= n_keys and 8 * n_keys <= budget_bytes
        self.dense = np.zeros(n_keys, np.int64) if dense else None

    def add(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add one sample's counts; its keys are distinct."""
        if self.dense is not None:
            self.dense[keys] += counts
            return
        self.keys.append(keys.astype(np.int64, copy=False))
        self.counts.append(counts.astype(np.int64, copy=False))
        self.n_rows += len(keys)
        if self.n_rows > self.max_rows:
            self._combine()
            if self.n_rows > self.max_rows // 2:  # combining did not free enough: spill
                self._spill()

    def _combine(self) -> None:
        keys, counts = combine(np.concatenate(self.keys), np.concatenate(self.counts))
        self.keys, self.counts, self.n_rows = [keys], [counts], len(keys)

    def _spill(self) -> None:
        import pyarrow.parquet as pq

        self.spill_dir.mkdir(parents=True, exist_ok=True)
        path = self.spill_dir / f"run-{len(self.runs):05d}.parquet"
        pq.write_table(pa.table({"key": self.keys[0], "count": self.counts[0]}), path)
        self.runs.append(path)
        self.keys, self.counts, self.n_rows = [], [], 0

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        """(distinct keys ascending, their summed counts)."""
        if self.dense is not None:
            keys = np.flatnonzero(self.dense)
            return keys.astype(np.int64), self.dense[keys]
        if not self.runs:
            if not self.keys:
                return np.zeros(0, np.int64), np.zeros(0, np.int64)
            self._combine()
            return self.keys[0], self.counts[0]
        if self.keys:
            self._combine()
            self._spill()
        return self._finish_out_of_core()

    def _finish_out_of_core(self):
        import duckdb

        tmp = self.spill_dir / "duckdb_tmp"
        con = duckdb.connect()
        con.execute(f"SET memory_limit = '{max(self.budget_bytes // 2**20, 64)}MB'")
        con.execute("SET temp_directory = ?", [str(tmp)])
        con.execute("SET preserve_insertion_order = false")
        files = [str(p) for p in self.runs]
        agg = con.execute(
            "SELECT key, sum(count)::BIGINT AS count FROM read_parquet(?) GROUP BY key ORDER BY key", [files]
        ).fetchnumpy()
        con.close()
        shutil.rmtree(self.spill_dir, ignore_errors=True)
        return agg["key"].astype(np.int64), agg["count"].astype(np.int64)


def combine(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum counts by key; keys come back sorted and distinct."""
    order = np.argsort(keys, kind="stable")
    keys, counts = keys[order], counts[order]
    starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
    return keys[starts], np.add.reduceat(counts, starts) if len(keys) else counts


class ChannelChunk:
    """Exact statistics and top examples of a sorted chunk of kept channels, for every head."""

    def __init__(self, keys: torch.Tensor, n_heads: int, n_examples: int):
        n, H, E = len(keys), n_heads, n_examples
        f64 = torch.float64
        self.keys = keys
        self.sum_NH, self.sumsq_NH = torch.zeros(n, H, dtype=f64), torch.zeros(n, H, dtype=f64)
        self.ind_count_N = torch.zeros(n, dtype=torch.long)
        self.ind_sum_NH, self.ind_sumsq_NH = torch.zeros(n, H, dtype=f64), torch.zeros(n, H, dtype=f64)
        self.ex_val_NHE = torch.zeros(n, H, E)
        self.ex_sample_NHE = torch.full((n, H, E), -1, dtype=torch.int32)
        self.ex_pos_NHE = torch.zeros(n, H, E, dtype=torch.int32)  # (q << 16) | k, q < 32768
        self.examples_sorted = True  # by |value| descending, then sample (the kernel's merge keeps them so)

    @staticmethod
    def bytes_per_channel(n_heads: int, n_examples: int) -> int:
        # key + 4 float64 sums per head + induction count + per example value, sample, position
        return 8 + 32 * n_heads + 8 + n_heads * n_examples * (4 + 4 + 4)

    def add(self, slots: SlotStats, sample: int, use_fused: bool = True) -> None:
        """Merge one sample's slots (all of which belong to this chunk)."""
        from ..core import fused

        on_cpu = slots.record_HP3.device.type == "cpu" and slots.record_HP3.is_contiguous()
        row_S = torch.searchsorted(self.keys, slots.keys_S.cpu())
        if use_fused and on_cpu and fused.available():
            fused.merge_slots(row_S, slots, self, sample)
            return
        self.sum_NH.index_add_(0, row_S, slots.sum_HS.T.cpu())
        self.sumsq_NH.index_add_(0, row_S, slots.sumsq_HS.T.cpu())
        self._add_examples(row_S, slots.best_HS.T.cpu(), slots.best_pos_HS.T.cpu(), sample)
        self.examples_sorted = False
        self.ind_count_N.index_add_(0, row_S, slots.ind_count_S.cpu())
        self.ind_sum_NH.index_add_(0, row_S, slots.ind_sum_HS.T.cpu())
        self.ind_sumsq_NH.index_add_(0, row_S, slots.ind_sumsq_HS.T.cpu())

    def _add_examples(self, row_S, best_SH, pos_SH, sample: int) -> None:
        """Each (channel, head) keeps its top examples by |value| descending, then sample
        ascending (so the result does not depend on the order samples come in): a candidate
        replaces the worst kept one (an empty slot is the worst) when it ranks above it."""
        cur = self.ex_val_NHE[row_S].abs()  # [S, H, E]
        eff = self.ex_sample_NHE[row_S].long()
        eff = torch.where(eff < 0, torch.iinfo(torch.int32).max, eff)
        worst = cur.min(-1, keepdim=True).values
        lo = torch.where(cur == worst, eff, -1).argmax(-1)  # among the smallest, the largest sample
        al = worst[..., 0]
        ab = best_SH.abs()
        better = (ab > al) | ((ab == al) & (ab > 0) & (sample < eff.gather(2, lo[..., None])[..., 0]))
        s_i, h_i = torch.nonzero(better, as_tuple=True)
        r, e = row_S[s_i], lo[s_i, h_i]
        self.ex_val_NHE[r, h_i, e] = best_SH[s_i, h_i]
        self.ex_sample_NHE[r, h_i, e] = sample
        self.ex_pos_NHE[r, h_i, e] = pos_SH[s_i, h_i]

    def tables(self, h: int, counts: np.ndarray, d_sae: int) -> tuple[pa.Table, pa.Table]:
        """(channels, examples) of head index `h` (position in the job's heads)."""
        keys = self.keys.numpy()
        fq, fk = (keys // d_sae).astype(np.int32), (keys % d_sae).astype(np.int32)
        channels = pa.table(
            {
                "feat_q": fq,
                "feat_k": fk,
                "count": counts,
                "sum": self.sum_NH[:, h].numpy(),
                "sumsq": self.sumsq_NH[:, h].numpy(),
                "ind_count": self.ind_count_N.numpy(),
                "ind_sum": self.ind_sum_NH[:, h].numpy(),
                "ind_sumsq": self.ind_sumsq_NH[:, h].numpy(),
            }
        )
        val = self.ex_val_NHE[:, h]  # [n, E]
        smp = self.ex_sample_NHE[:, h]
        pos = self.ex_pos_NHE[:, h]
        if not self.examples_sorted:  # the PyTorch merge keeps them unordered
            order = torch.sort(smp.long(), dim=-1, stable=True).indices  # sample ascending, then
            order = order.gather(
                1, torch.sort(val.abs().gather(1, order), dim=-1, descending=True, stable=True).indices
            )
            val, smp, pos = val.gather(1, order), smp.gather(1, order), pos.gather(1, order)
        n, E = val.shape
        have = (smp >= 0) & (val != 0)
        idx = have.flatten().numpy()
        examples = pa.table(
            {
                "feat_q": np.repeat(fq, E)[idx],
                "feat_k": np.repeat(fk, E)[idx],
                "rank": np.tile(np.arange(E, dtype=np.int8), n)[idx],
                "sample": smp.flatten().numpy()[idx],
                "q": (pos.long() >> POS_SHIFT).flatten().numpy().astype(np.int16)[idx],
                "k": (pos & ((1 << POS_SHIFT) - 1)).flatten().numpy().astype(np.int16)[idx],
                "value": val.flatten().numpy()[idx],
            }
        )
        return channels, examples

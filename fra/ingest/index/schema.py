"""The index format: one place that says what every table holds (Arrow schemas with a sentence
per column), what the manifest holds (`Manifest`), and which code version wrote it.

Everything that writes or reads an index (the ingest, merge, the views, the app, the bench)
takes its table names, columns and manifest from here. `docs/INDEX_SCHEMA.md` is generated
from this module (`python -m fra.ingest.index.schema > docs/INDEX_SCHEMA.md`, checked by a test).
Imports pyarrow only, so the query side and the app can use it without torch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

SCHEMA_VERSION = 3  # 3: the manifest records every file (`files`)


class IndexFormatError(ValueError):
    """An index directory, or a job's input, is unusable; the message says why."""


@dataclass(frozen=True)
class Table:
    name: str
    partitioned: bool  # hive-partitioned (by the columns of `by`)
    about: str
    columns: tuple[tuple[str, pa.DataType, str], ...]  # name, type, meaning
    by: tuple[str, ...] = ("layer", "head")  # the hive partition columns of a partitioned table
    optional: bool = False  # written by the explain pass (`fra explain`); an index may lack it

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema; each field carries its meaning as metadata `description`, so the
        Parquet files describe themselves."""
        return pa.schema([pa.field(n, t, metadata={"description": m}) for n, t, m in self.columns])


TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "channels",
            True,
            "Exact statistics of every kept channel (layer, head, feat_q, feat_k) over the whole corpus, "
            "from all FA entries before any pruning. Kept: channels whose `count` is at least "
            "`policy.min_count` (decided by an exact count pass before the statistics pass).",
            (
                ("feat_q", pa.int32(), "SAE feature active at the query position"),
                ("feat_k", pa.int32(), "SAE feature active at the key position"),
                (
                    "count",
                    pa.int64(),
                    "causal (q, k) pairs with feat_q active at q and feat_k at k (the same for every head)",
                ),
                ("sum", pa.float64(), "sum of FA[q, k, feat_q, feat_k] over those pairs"),
                ("sumsq", pa.float64(), "sum of squares of the same"),
                ("ind_count", pa.int64(), "count restricted to induction targets (see pairs.induction)"),
                ("ind_sum", pa.float64(), "sum restricted to induction targets"),
                ("ind_sumsq", pa.float64(), "sum of squares restricted to induction targets"),
            ),
        ),
        Table(
            "examples",
            True,
            "The strongest entries of every channel in `channels`: per sample the entry of largest "
            "|FA| (the first in scan order on ties), then the `policy.examples_per_channel` samples "
            "where that entry is largest (the smaller sample id on ties). So a channel's examples "
            "come from distinct samples, and do not depend on the order samples are processed in.",
            (
                ("feat_q", pa.int32(), "query-side feature"),
                ("feat_k", pa.int32(), "key-side feature"),
                ("rank", pa.int8(), "0 for the largest |value|"),
                ("sample", pa.int32(), "sample id (samples.sample)"),
                ("q", pa.int16(), "query position"),
                ("k", pa.int16(), "key position"),
                ("value", pa.float32(), "FA[q, k, feat_q, feat_k]"),
            ),
        ),
        Table(
            "rows",
            True,
            "What drives the attention: for every (head, sample, query) the `policy.top_keys` keys "
            "with the largest attention probability, and for each of those (q, k) the "
            "`policy.top_pairs` feature pairs of largest |FA|. `pairs.kept` sums them per (q, k).",
            (
                ("sample", pa.int32(), "sample id"),
                ("q", pa.int16(), "query position"),
                ("k", pa.int16(), "key position (one of the query's most-attended keys)"),
                ("feat_q", pa.int32(), "query-side feature"),
                ("feat_k", pa.int32(), "key-side feature"),
                ("value", pa.float32(), "FA[q, k, feat_q, feat_k]"),
                ("induction", pa.bool_(), "k is an induction target of q"),
            ),
        ),
        Table(
            "pairs",
            True,
            "One row per causal (sample, q, k): the exact split of the model's score. "
            "`score = ff + f_bdec + f_err + bdec_f + err_f + resid_resid + bias` up to float32 rounding.",
            (
                ("sample", pa.int32(), "sample id"),
                ("q", pa.int16(), "query position"),
                ("k", pa.int16(), "key position, k <= q"),
                ("induction", pa.bool_(), "k = p + 1 where token[p] == token[q] and p < q - 1"),
                ("score", pa.float32(), "the model's own blocks.L.attn.hook_attn_scores"),
                ("ff", pa.float32(), "sum of all feature x feature terms (exact, before pruning)"),
                ("ff_abs", pa.float32(), "sum of |FA| over all feature pairs"),
                ("kept", pa.float32(), "sum of this (q, k)'s rows (0 when k is not a most-attended key)"),
                ("kept_abs", pa.float32(), "sum of |value| of the same rows"),
                ("f_bdec", pa.float32(), "query features x key b_dec"),
                ("f_err", pa.float32(), "query features x key SAE error"),
                ("bdec_f", pa.float32(), "query b_dec x key features"),
                ("err_f", pa.float32(), "query SAE error x key features"),
                ("resid_resid", pa.float32(), "(b_dec + error) x (b_dec + error)"),
                ("bias", pa.float32(), "every term with the norm bias or b_Q / b_K (0 for Llama-style models)"),
            ),
        ),
        Table(
            "example_terms",
            True,
            "The exact split of the model's score at every distinct (layer, head, sample, q, k) of "
            "`examples`, written by the explain pass (`fra explain`, run by `fra ingest` unless "
            "`--explain-pairs 0`). Per point: `kind` 'pair' rows for the `policy.explain_pairs` "
            "feature pairs of largest |FA| (ties: smaller feat_q, then feat_k, first; a channel of "
            "`examples` not among them is smaller in |FA| than all of them), then one row (rank -1, "
            "feat_q = feat_k = -1) each for "
            "'ff_rest' (every other feature x feature term), 'b_dec' (feature x b_dec, b_dec x feature "
            "and b_dec x b_dec), 'error' (every term with the SAE error, b_dec x error included), "
            "'bias' (every term with the norm bias or b_Q / b_K) and 'score' (the model's score). "
            "The 'pair', 'ff_rest', 'b_dec', 'error' and 'bias' values of a point sum to its 'score' "
            "up to float32 rounding.",
            (
                ("sample", pa.int32(), "sample id"),
                ("q", pa.int16(), "query position"),
                ("k", pa.int16(), "key position"),
                ("rank", pa.int16(), "'pair': 0 for the largest |value| at this point; -1 for the other kinds"),
                ("kind", pa.string(), "'pair', 'ff_rest', 'b_dec', 'error', 'bias' or 'score'"),
                ("feat_q", pa.int32(), "query-side feature of a 'pair' row, else -1"),
                ("feat_k", pa.int32(), "key-side feature of a 'pair' row, else -1"),
                ("value", pa.float32(), "FA[q, k, feat_q, feat_k] for 'pair', else the group's sum"),
            ),
            optional=True,
        ),
        Table(
            "activations",
            True,
            "Every nonzero SAE activation of every indexed sample (written by the explain pass).",
            (
                ("sample", pa.int32(), "sample id"),
                ("pos", pa.int16(), "token position"),
                ("feat", pa.int32(), "SAE latent"),
                ("act", pa.float32(), "its activation (the SAE's encode, float32)"),
            ),
            by=("layer",),
            optional=True,
        ),
        Table(
            "channel_diag",
            True,
            "The q = k entries of every channel in `channels` (written by the explain pass): subtract "
            "them from `channels.count` and `channels.sum` to leave out each token's attention to "
            "itself. Channels with no q = k entry have no row.",
            (
                ("feat_q", pa.int32(), "query-side feature"),
                ("feat_k", pa.int32(), "key-side feature"),
                ("count", pa.int64(), "positions where feat_q and feat_k are both active"),
                ("sum", pa.float64(), "sum of FA[t, t, feat_q, feat_k] over those positions"),
            ),
            optional=True,
        ),
        Table(
            "samples",
            False,
            "The indexed samples.",
            (
                ("sample", pa.int32(), "sample id (the corpus' sample_id, else its row number)"),
                ("text", pa.string(), "the sample's text"),
                ("token_ids", pa.list_(pa.int32()), "token ids, BOS first"),
                ("tokens", pa.list_(pa.string()), "each token decoded on its own"),
                ("n_tokens", pa.int16(), "number of tokens"),
            ),
        ),
        Table(
            "features",
            False,
            "Per (layer, feature): statistics on the indexed corpus, joined with the SAE's own "
            "feature table when it ships one (labels from held-out text).",
            (
                ("layer", pa.int64(), "layer"),
                ("feature", pa.int64(), "SAE latent"),
                ("index_frequency", pa.float64(), "share of indexed tokens where the feature fires"),
                ("bos_rate", pa.float64(), "share of samples where it fires on position 0 (BOS)"),
                (
                    "label",
                    pa.string(),
                    "automatic label: the most common activating tokens (NULL without a feature table)",
                ),
                ("top_tokens", pa.list_(pa.string()), "those tokens, structured"),
                ("prev_token", pa.string(), "the dominant preceding token, when one dominates"),
                ("frequency", pa.float64(), "firing rate on held-out text (NULL without a feature table)"),
                ("mean_act_when_active", pa.float64(), "mean activation when firing, on held-out text"),
                ("max_act", pa.float64(), "largest activation on held-out text"),
                ("top_contexts", pa.list_(pa.string()), "top-activating held-out contexts, the token in [[ ]]"),
                ("punct_or_bos", pa.bool_(), "fires on BOS in most samples, or its label holds no letter or digit"),
            ),
        ),
    )
}
PARTITIONED = tuple(name for name, t in TABLES.items() if t.partitioned)


def table_glob(root: Path, name: str) -> str:
    """The Parquet glob of one table under an index root."""
    return str(Path(root) / name / ("**/*.parquet" if TABLES[name].partitioned else "*.parquet"))


def code_version() -> str:
    """Hash of the code that computes an index: the FRA core and the index package."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for path in sorted([*here.glob("*.py"), *(here.parent / "core").glob("*.py")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass(frozen=True)
class Manifest:
    """manifest.json: what an index holds and how it was built."""

    model: str  # preset or TransformerLens name
    sae: dict  # layer (str) -> SAE identity: weights hash of a local directory, or RELEASE:ID
    corpus: str  # sha256 prefix of the corpus file, or a caller-given identity
    policy: dict  # the keep-policy: min_count, top_keys, top_pairs, examples_per_channel, ...
    layers: list
    heads: list
    n_samples: int
    shard: str  # "0/1": every sample (the blocks of `--shard i/n` runs finish into one index)
    stats: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)  # path -> {sha256, bytes, rows}, written by `store.IndexWriter.commit`
    code_version: str = field(default_factory=code_version)
    created: str = field(default_factory=lambda: now())
    schema_version: int = SCHEMA_VERSION

    @property
    def identity(self) -> dict:
        return {"model": self.model, "sae": self.sae, "corpus": self.corpus}

    def write(self, root: Path) -> None:
        path = Path(root) / "manifest.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        tmp.replace(path)

    @classmethod
    def read(cls, root: Path) -> "Manifest":
        path = Path(root) / "manifest.json"
        if not path.exists():
            raise IndexFormatError(f"{root} is not an FRA index (no manifest.json); build one with `fra ingest`")
        try:
            m = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise IndexFormatError(f"{path} is not valid JSON ({exc})") from None
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = set(m) - names, names - set(m)
        if unknown or missing:
            raise IndexFormatError(f"manifest of {root}: unknown keys {sorted(unknown)}, missing {sorted(missing)}")
        if m["schema_version"] != SCHEMA_VERSION:
            raise IndexFormatError(
                f"{root} has schema_version {m['schema_version']}; this code reads {SCHEMA_VERSION}. "
                "Rebuild the index with this version's `fra ingest`."
            )
        return cls(**m)


def markdown() -> str:
    """docs/INDEX_SCHEMA.md."""
    out = [
        f"# FRA index schema (schema_version {SCHEMA_VERSION})",
        "",
        "Generated from `fra/ingest/index/schema.py` (`python -m fra.ingest.index.schema > docs/INDEX_SCHEMA.md`).",
        "",
        "An index is one directory written by `fra ingest`. Tables are Parquet (zstd); the partitioned",
        "ones are hive-partitioned by `layer` and `head` (`activations` by `layer` only), so DuckDB and",
        "pyarrow read those as columns. The tables marked optional are written by the explain pass",
        "(`fra explain --index OUT` after the ingest, or `fra ingest --explain-pairs N`); an",
        "index without them reads as empty tables. Each column's meaning below is also stored in the",
        "Parquet files, as the Arrow field metadata `description`",
        "(`pyarrow.parquet.read_schema(path).field(name).metadata`).",
        "",
        "```",
        "manifest.json",
        *[
            f"{t.name}/"
            + ("".join(f"{c}={c[0].upper()}/" for c in t.by) + "part-*.parquet" if t.partitioned else "part-0.parquet")
            for t in TABLES.values()
        ],
        "```",
        "",
        "Notation: FA[q, k, i, j] = <a_i(q) Q_i(q), a_j(k) K_j(k)> with rotary, norm scale and 1/sqrt(d_head)",
        "folded in (`fra/ingest/core/decompose.py`). Positions count from 0; position 0 is the prepended BOS.",
        "",
        "## manifest.json",
        "",
        "| key | meaning |",
        "|---|---|",
    ]
    about = {
        "model": "preset name or TransformerLens model name",
        "sae": "per layer: sha256 prefix of the SAE weights file, or `RELEASE:ID` of a sae-lens release",
        "corpus": "sha256 prefix of the corpus Parquet (or the caller's identity for in-memory samples)",
        "policy": "the keep-policy and job options: `min_count`, `top_keys`, `top_pairs`, "
        "`examples_per_channel`, `max_tokens`, `split`, `max_samples`, `block_size` (the unit whose "
        "float sums are added in block order), `memory_budget_gb`; `explain_pairs` once the explain pass "
        "has run (the 'pair' rows per point of `example_terms`)",
        "layers": "indexed layers",
        "heads": "indexed heads",
        "n_samples": "number of samples",
        "shard": "`0/1`: the index holds every sample of the job (`fra ingest --shard i/n` runs compute "
        "blocks, and `fra merge` writes one index of all of them)",
        "stats": "per layer: blocks, worker seconds summed over blocks, samples/s per worker, merge "
        "seconds, channels seen / kept / spilled runs; per head the rows kept and `kept_abs_share`",
        "files": "every file of the index (path relative to the index) with its sha256, size in bytes and "
        "Parquet row count, recorded when written; checked when the index is opened (`store.open_index`)",
        "code_version": "sha256 prefix of `fra/ingest/core/*.py` and `fra/ingest/index/*.py`",
        "created": "UTC time",
        "schema_version": str(SCHEMA_VERSION),
    }
    out += [f"| {f.name} | {about[f.name]} |" for f in dataclasses.fields(Manifest)]
    out += ["", "Unknown or missing keys, or another schema_version, are an error when reading (`Manifest.read`)."]
    for t in TABLES.values():
        out += [
            "",
            f"## {t.name}"
            + (f" (partitioned by {', '.join(t.by)})" if t.partitioned else "")
            + (" (optional)" if t.optional else ""),
            "",
            t.about,
            "",
            "| column | type | meaning |",
            "|---|---|---|",
        ]
        out += [f"| {n} | {ty} | {m} |" for n, ty, m in t.columns]
    out += [
        "",
        "Signed min and max per channel are not stored: `examples` holds each channel's largest",
        "|FA| entries (so the largest |value| is exact there), and the two extra scatter passes per",
        "entry were the most expensive part of the old statistics pass while no view read them.",
    ]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")

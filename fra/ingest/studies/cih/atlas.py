"""Stage 2b, interesting interactions: an atlas of the strongest channels of an index.

Two rankings over every head of the index, with channels that touch BOS, punctuation or a
function word filtered out on either side:
- by mean value when active (channels seen at least `min_count` times);
- by |value| anywhere: the largest single kept entries (one per channel).
Each channel gets its two feature labels (the index's features table), one stored example with
its tokens, and an induction flag: it is active at induction targets (key = the token after an
earlier copy of the query's token) and its mean there exceeds twice its mean elsewhere. The flag is
descriptive, not a test: no null control, no correction for the number of channels looked at; the
CIH study (report.md) is where induction-like claims are tested.

`fra report atlas --atlas-index PATH` writes reports/atlas/atlas.md and atlas.parquet; it needs
no model (DuckDB over the index only).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

FUNCTION_WORDS = frozenset(
    "a an the and or but if of to in on at by for with from as is are was were be been it its this that these "
    "those he she they we you i me him her them his their our your my not no so than then there here what which "
    "who whom when where why how all any each some do does did has have had will would can could should may "
    "might must".split()
)


def _noise(con) -> pd.DataFrame:
    """(layer, feature) of features on BOS / punctuation, or whose commonest token is a function word."""
    f = con.execute("SELECT layer, feature, punct_or_bos, top_tokens, label FROM features").df()

    def word(tokens) -> str:
        try:
            return str(tokens[0]).strip().lower()
        except (TypeError, IndexError, KeyError):  # NULL (no feature table) or empty
            return ""

    bad = f["punct_or_bos"].fillna(False).astype(bool) | f["top_tokens"].map(word).isin(FUNCTION_WORDS)
    return f.loc[bad, ["layer", "feature"]]


def _token_ok(t) -> bool:
    t = str(t or "").strip()
    return any(ch.isalnum() for ch in t) and t.lower() not in FUNCTION_WORDS


def atlas(index: Path, n: int = 15, min_count: int = 3) -> dict[str, pd.DataFrame]:
    """The two rankings (module docstring) as DataFrames: 'by_mean' and 'by_abs'."""
    from fra.queries import connect

    con = connect(index)
    noise = _noise(con)
    con.register("atlas_noise", noise)
    stats = con.execute(
        """
        SELECT s.* FROM channel_stats s
        ANTI JOIN atlas_noise a ON a.layer = s.layer AND a.feature = s.feat_q
        ANTI JOIN atlas_noise b ON b.layer = s.layer AND b.feature = s.feat_k
        WHERE s.count >= ?
        ORDER BY abs(s.mean) DESC LIMIT ?
        """,
        [min_count, 20 * n],
    ).df()
    entries = con.execute(
        """
        SELECT e.* FROM top_entries_n(20000) e
        ANTI JOIN atlas_noise a ON a.layer = e.layer AND a.feature = e.feat_q
        ANTI JOIN atlas_noise b ON b.layer = e.layer AND b.feature = e.feat_k
        WHERE e.k > 0
        """
    ).df()
    entries = entries[entries.token_q.map(_token_ok) & entries.token_k.map(_token_ok)]
    entries = entries.drop_duplicates(["layer", "head", "feat_q", "feat_k"]).head(n)
    labels = con.execute("SELECT layer, feature, label FROM features").df()
    lab = {(int(r.layer), int(r.feature)): r.label or "" for r in labels.itertuples()}

    def example(r) -> dict:
        ex = con.execute(
            """
            SELECT e.sample, e.q, e.k, e.value, s.tokens[e.q + 1] AS token_q, s.tokens[e.k + 1] AS token_k,
                   array_to_string(s.tokens[greatest(e.k - 3, 1) : e.k + 1], '') AS context_k,
                   array_to_string(s.tokens[greatest(e.q - 3, 1) : e.q + 1], '') AS context_q
            FROM examples e JOIN samples s USING (sample)
            WHERE e.layer = ? AND e.head = ? AND e.feat_q = ? AND e.feat_k = ? AND e.k > 0
            ORDER BY abs(e.value) DESC LIMIT 20
            """,
            [int(r.layer), int(r.head), int(r.feat_q), int(r.feat_k)],
        ).df()
        ex = ex[ex.token_q.map(_token_ok) & ex.token_k.map(_token_ok)]
        if ex.empty:
            return dict(example="", example_value=float("nan"))
        e = ex.iloc[0]
        return dict(example=f"{e.context_k!r} ... {e.context_q!r}", example_value=float(e.value))

    def finish(df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        df["label_q"] = [lab.get((int(a), int(b)), "") for a, b in zip(df.layer, df.feat_q)]
        df["label_k"] = [lab.get((int(a), int(b)), "") for a, b in zip(df.layer, df.feat_k)]
        ex = pd.DataFrame([example(r) for r in df.itertuples()], index=df.index)
        return pd.concat([df, ex], axis=1)

    by_mean = stats.head(n)
    st = con.execute(
        "SELECT layer, head, feat_q, feat_k, count, mean, ind_count, ind_mean, other_mean FROM channel_stats"
    ).df()
    by_abs = entries.merge(st, on=["layer", "head", "feat_q", "feat_k"], how="left")
    out = {"by_mean": finish(by_mean), "by_abs": finish(by_abs)}
    for df in out.values():
        other = df["other_mean"].fillna(0.0).abs()
        df["induction_flag"] = (df["ind_count"].fillna(0) > 0) & (df["ind_mean"].fillna(0) > 2 * other)
        df["head_name"] = df["layer"].astype(str) + "." + df["head"].astype(str)
    return out


def write_atlas(index: Path, out: Path, n: int = 15, min_count: int = 3) -> Path:
    """atlas.md and atlas.parquet into `out`; returns the markdown's path."""
    from .report import table

    tabs = atlas(index, n, min_count)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    both = pd.concat([df.assign(ranking=name) for name, df in tabs.items()], ignore_index=True)
    both.to_parquet(out / "atlas.parquet", index=False)
    cols = ["head_name", "feat_q", "label_q", "feat_k", "label_k", "count", "mean", "induction_flag", "example"]
    fmt = {"count": lambda v: str(int(v)) if v == v else "–", "induction_flag": lambda b: "yes" if b else ""}
    from fra.queries import manifest

    meta = manifest(index)
    md = (
        f"# Atlas of interesting interactions\n\nIndex `{index}`: {meta.get('model')}, layers {meta.get('layers')}, "
        f"{meta.get('n_samples')} samples. Reproduce: `fra report atlas --atlas-index {index}`. Channels touching "
        "BOS, punctuation or a function word (on either side) are left out. Labels are the index's feature labels. "
        "'induction_flag': active at induction targets with a mean there above twice its mean elsewhere; a "
        "description, not a test (no null control, no correction for the number of channels looked at).\n\n"
        f"## Top channels by mean value when active (seen >= {min_count} times)\n\n"
        + table(tabs["by_mean"], cols, fmt)
        + "\n\n## Top channels by |value| anywhere (the largest single entries, one per channel)\n\n"
        + table(
            tabs["by_abs"],
            [
                "head_name",
                "feat_q",
                "label_q",
                "feat_k",
                "label_k",
                "value",
                "token_q",
                "token_k",
                "induction_flag",
                "example",
            ],
            fmt,
        )  # fmt: skip
        + f"\n\n{int(both.induction_flag.sum())} of {len(both)} listed channels carry the induction flag.\n"
    )
    (out / "atlas.md").write_text(md)
    return out / "atlas.md"

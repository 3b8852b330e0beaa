"""The stage-2b atlas on the tiny index: both rankings, noise filtered, labels and examples."""

from __future__ import annotations

import duckdb

from fra.ingest.studies.cih.atlas import FUNCTION_WORDS, _noise, atlas, write_atlas
from fra.queries import connect


def test_atlas_ranks_filters_and_explains(tiny_index, tmp_path):
    tabs = atlas(tiny_index, n=5, min_count=1)
    con = connect(tiny_index)
    noise = set(map(tuple, _noise(con).to_numpy().tolist()))
    by_mean, by_abs = tabs["by_mean"], tabs["by_abs"]
    assert len(by_mean) and len(by_abs)
    # ranked by |mean| when active, and the same numbers as the index's own view
    assert by_mean["mean"].abs().is_monotonic_decreasing
    ref = con.execute("SELECT mean FROM channel_stats WHERE layer = ? AND head = ? AND feat_q = ? AND feat_k = ?",
                      [int(by_mean.layer[0]), int(by_mean["head"][0]), int(by_mean.feat_q[0]), int(by_mean.feat_k[0])]
                      ).fetchone()[0]  # fmt: skip
    assert by_mean["mean"][0] == ref
    for df in (by_mean, by_abs):
        for r in df.itertuples():
            assert (r.layer, r.feat_q) not in noise and (r.layer, r.feat_k) not in noise
    assert by_abs["value"].abs().is_monotonic_decreasing
    assert not by_abs.duplicated(["layer", "head", "feat_q", "feat_k"]).any()
    for t in list(by_abs.token_q) + list(by_abs.token_k):
        assert t.strip().lower() not in FUNCTION_WORDS and any(c.isalnum() for c in t)
    md = write_atlas(tiny_index, tmp_path, n=5, min_count=1).read_text()
    assert md.startswith("# Atlas of interesting interactions") and "by mean value when active" in md
    assert len(duckdb.sql(f"SELECT * FROM '{tmp_path / 'atlas.parquet'}'").df()) == len(by_mean) + len(by_abs)

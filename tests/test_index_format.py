"""The index format's one owner (fra.ingest.index.schema): the generated doc, the manifest's
validation, and the Python API path into the same writer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pyarrow as pa
import pytest

from fra.ingest.index.schema import SCHEMA_VERSION, TABLES, IndexFormatError, Manifest, markdown
from fra.ingest.index.store import conform

ROOT = Path(__file__).resolve().parent.parent


def test_schema_doc_is_generated_from_the_schema():
    assert (ROOT / "docs" / "INDEX_SCHEMA.md").read_text() == markdown(), (
        "docs/INDEX_SCHEMA.md is stale: python -m fra.ingest.index.schema > docs/INDEX_SCHEMA.md"
    )


def test_manifest_round_trip_and_validation(tmp_path):
    m = Manifest(
        model="m",
        sae={"3": "abc"},
        corpus="c",
        policy={"min_count": 2},
        layers=[3],
        heads=[0, 1],
        n_samples=4,
        shard="0/1",
        stats={"3": {"x": 1}},
    )
    m.write(tmp_path)
    assert Manifest.read(tmp_path) == m
    raw = json.loads((tmp_path / "manifest.json").read_text())
    for bad, match in (
        ({**raw, "extra": 1}, r"unknown keys \['extra'\]"),
        ({k: v for k, v in raw.items() if k != "heads"}, r"missing \['heads'\]"),
        ({**raw, "schema_version": SCHEMA_VERSION - 1}, "Rebuild the index"),
    ):
        (tmp_path / "manifest.json").write_text(json.dumps(bad))
        with pytest.raises(IndexFormatError, match=match):
            Manifest.read(tmp_path)
    with pytest.raises(IndexFormatError, match="not an FRA index"):
        Manifest.read(tmp_path / "nowhere")


def test_conform_orders_casts_and_refuses_missing_columns():
    t = pa.table(
        {
            "feat_k": [1],
            "feat_q": [2],
            "count": [3],
            "sum": [1.0],
            "sumsq": [1.0],
            "ind_count": [0],
            "ind_sum": [0.0],
            "ind_sumsq": [0.0],
            "extra": ["dropped"],
        }
    )
    out = conform("channels", t)
    assert out.schema == TABLES["channels"].schema and out["feat_q"].to_pylist() == [2]
    with pytest.raises(IndexFormatError, match=r"lacks columns \['sumsq'\]"):
        conform("channels", t.drop(["sumsq"]))


def test_python_api_writes_the_same_index(tmp_path):
    """ingest(model, saes, token lists) with objects the user holds = run() from Inputs."""
    from fra.ingest.index.build import IngestConfig, ingest, run
    from fra.ingest.tools.testing import tiny_inputs
    from fra.queries import connect

    inp = tiny_inputs()
    ingest(inp.lm.model, inp.saes, inp.tokens, tmp_path / "api", name="tiny", min_count=1, progress=False)
    run(IngestConfig(out=tmp_path / "run", model="tiny", min_count=1, progress=False), tiny_inputs())
    a, b = connect(tmp_path / "api"), connect(tmp_path / "run")
    for table in ("channels", "examples", "rows", "pairs"):
        q = f"SELECT * FROM {table} ORDER BY ALL"
        assert a.execute(q).fetchall() == b.execute(q).fetchall(), table
    m = Manifest.read(tmp_path / "api")
    assert set(m.sae) == {"0", "1"} and all(len(v) == 16 for v in m.sae.values())  # weights hashes
    assert dataclasses.asdict(m)["policy"]["min_count"] == 1


def test_parquet_columns_carry_their_descriptions(explained_index):
    """Every column of every table file says what it holds (Arrow field metadata from schema.TABLES)."""
    import pyarrow.parquet as pq

    for name, table in TABLES.items():
        files = sorted((explained_index / name).rglob("*.parquet"))
        assert files, name
        for f in files:
            schema = pq.read_schema(f)
            for col, _, meaning in table.columns:
                assert schema.field(col).metadata == {b"description": meaning.encode()}, (f, col)


def test_manifest_records_every_file_with_its_checksum(tiny_index):
    import hashlib

    import pyarrow.parquet as pq

    m = Manifest.read(tiny_index)
    on_disk = {p.relative_to(tiny_index).as_posix() for p in tiny_index.rglob("*") if p.is_file()}
    assert set(m.files) == on_disk - {"manifest.json"}
    for rel, rec in m.files.items():
        path = tiny_index / rel
        assert rec["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert rec["rows"] == pq.read_metadata(path).num_rows and rec["bytes"] == path.stat().st_size


def test_job_round_trips_and_the_budget_owns_every_split():
    from fra.ingest.index.job import Budget, IngestConfig, Job

    cfg = IngestConfig(min_count=3, block_size=5, memory_budget_gb=2.0)
    job = Job(
        model="m",
        sae={"3": "abc"},
        corpus="c",
        policy=cfg.policy,
        layers=(3,),
        heads=(0, 2),
        n_samples=11,
        d_sae={"3": 24},
    )
    data = json.loads(json.dumps(job.to_json()))  # as job.json holds it
    assert Job.from_json(data) == job and job.n_blocks == 3  # ceil(11 / 5)
    assert data["policy"]["min_count"] == 3 and data["layers"] == [3]
    with pytest.raises(IndexFormatError, match="job file: keys"):
        Job.from_json({**data, "extra": 1})
    assert job.differences(Job.from_json({**data, "heads": [0]})) == ["heads"]
    b = job.budget  # 2 GB: a quarter for counts, three quarters per sweep, an eighth of rows buffered
    assert (b.total_bytes, b.count_bytes, b.sweep_bytes, b.flush_bytes) == (2e9, 5e8, 15e8, 25e7)
    assert (b.select_bytes, b.merge_bytes) == (5e8, 2e9)
    assert b.channels_per_sweep(1000) == 1_500_000 and Budget(10).channels_per_sweep(1000) == 1
    # floor at 128 tokens: 128 * 129 / 2 = 8256 pairs x 16 bytes x 3 (buffer = a third) x 4 (a quarter)
    assert Budget.floor_bytes(128) == 8256 * 16 * 3 * 4 == 1_585_152

"""What the user owns is never deleted or changed, and every failure reads like a CLI's:
`fra sql` cannot write or read outside the index, `fra export` deletes only its own files, an
index that does not match its manifest is refused naming the file, queries name what is not
indexed, and errors are one line on stderr with exit code 2 (usage) or 1 (runtime)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fra.cli import main
from fra.ingest.index.schema import IndexFormatError
from fra.queries import connect
from fra.queries.cli import export

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def index(tiny_index, tmp_path):
    """A copy of the tiny index that a test may damage."""
    dest = tmp_path / "index"
    shutil.copytree(tiny_index, dest)
    return dest


def files_under(path: Path) -> dict:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ fra sql


@pytest.mark.parametrize(
    "sql,refused",
    [
        ("COPY (SELECT 1 AS x) TO '{tmp}/out.csv'", "refused COPY"),
        ("COPY (SELECT * FROM channels) TO '{index}/channels/layer=0/head=0/evil.parquet'", "refused COPY"),
        ("ATTACH '{tmp}/db.duckdb'", "refused ATTACH"),
        ("SELECT 1; CREATE TABLE t AS SELECT 1", "refused CREATE"),
        ("SELECT * FROM read_text('{tmp}/secret.txt')", "Permission Error"),
        ("SELECT count(*) FROM read_parquet('{other}/channels/**/*.parquet')", "Permission Error"),
        ("SET enable_external_access = true", "refused SET"),
    ],
)
def test_sql_is_read_only(index, tiny_index, tmp_path, capsys, sql, refused):
    (tmp_path / "secret.txt").write_text("not the index's")
    before = files_under(tmp_path)
    code = main(["sql", "--index", str(index), sql.format(tmp=tmp_path, index=index, other=tiny_index)])
    err = capsys.readouterr().err
    assert code == 1 and refused in err and err.count("\n") == 1, err
    assert files_under(tmp_path) == before  # nothing written, inside the index or out of it
    assert connect(index).execute("SELECT count(*) FROM channels").fetchone()[0] > 0


def test_sql_reads(index, capsys):
    assert main(["sql", "--index", str(index), "SELECT count(*) AS n FROM channels; DESCRIBE pairs"]) == 0
    out = capsys.readouterr().out
    assert "column_name" in out and "induction" in out


# ------------------------------------------------------------------------------ fra export


def test_export_refuses_a_non_empty_out_and_deletes_only_its_own_files(index, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["export", "--index", str(index), "--out", str(out), "--partition-by", ""])
    assert code == 1 and "is not empty" in capsys.readouterr().err
    code = main(["export", "--index", str(index), "--out", str(out), "--partition-by", "", "--overwrite"])
    assert code == 1 and "holds no earlier export" in capsys.readouterr().err
    assert files_under(out) == {"notes.txt": b"mine"}
    # an export, then a user file inside its partitions, then --overwrite with another filter
    out2 = tmp_path / "out2"
    assert main(["export", "--index", str(index), "--out", str(out2), "--layer", "0"]) == 0
    first = json.loads((out2 / "_fra_export.json").read_text())["files"]
    assert first and all(f.startswith("layer=0/head=") for f in first)
    (out2 / "layer=0" / "head=0" / "mine.txt").write_text("mine")
    assert main(["export", "--index", str(index), "--out", str(out2), "--layer", "1"]) == 1
    assert main(["export", "--index", str(index), "--out", str(out2), "--layer", "1", "--overwrite"]) == 0
    assert "1 file(s) in" in capsys.readouterr().err  # the user's file, named, kept
    now = files_under(out2)
    assert now["layer=0/head=0/mine.txt"] == b"mine"
    assert not any(f in now for f in first)  # the first export's files are replaced, not mixed in
    assert all(f.startswith("layer=1/") for f in json.loads(now["_fra_export.json"])["files"])


@pytest.mark.parametrize("where", ["the index", "inside it"])
def test_export_refuses_an_out_in_the_index(index, capsys, where):
    before = files_under(index)
    out = index if where == "the index" else index / "channels" / "exported"
    code = main(["export", "--index", str(index), "--out", str(out), "--overwrite"])
    assert code == 1 and "is inside the index" in capsys.readouterr().err
    assert files_under(index) == before


def test_export_python_api(index, tmp_path):
    n = export(connect(index), "channels", tmp_path / "o", layer=1, index=index)
    assert n == connect(index).execute("SELECT count(*) FROM channels WHERE layer = 1").fetchone()[0] > 0


# ------------------------------------------------------------------------------ the index checked on open


def test_tampered_manifest_is_refused(index):
    m = json.loads((index / "manifest.json").read_text())
    (index / "manifest.json").write_text(json.dumps({**m, "layers": [3]}))
    with pytest.raises(IndexFormatError, match=r"lacks the partition .*channels/layer=3/head=0"):
        connect(index)
    (index / "manifest.json").write_text(json.dumps({**m, "n_samples": 999}))
    with pytest.raises(IndexFormatError, match=r"says n_samples 999, but .*samples holds 5 rows"):
        connect(index)


def test_a_file_fra_did_not_write_or_a_changed_file_is_refused(index):
    extra = index / "channels" / "layer=0" / "head=0" / "evil.parquet"
    shutil.copy(next(extra.parent.glob("part-*.parquet")), extra)
    with pytest.raises(IndexFormatError, match=r"evil.parquet was not written by FRA"):
        connect(index)
    extra.unlink()
    part = next((index / "examples" / "layer=1" / "head=2").glob("*.parquet"))
    part.write_bytes(part.read_bytes()[:-10])
    with pytest.raises(IndexFormatError, match=r"head=2/part-[\d-]+\.parquet has \d+ bytes, \d+ were written"):
        connect(index)


def test_verify_checks_every_checksum(index, capsys):
    """A same-size change that opening (sizes only) lets through: `fra query verify` names it."""
    assert main(["query", "--index", str(index), "verify"]) == 0
    n = len(json.loads((index / "manifest.json").read_text())["files"])
    assert n >= 34 and f"all {n} files match" in capsys.readouterr().out  # 2 layers x 4 heads x 4 tables + 2
    part = next((index / "pairs" / "layer=0" / "head=1").glob("*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    connect(index)  # the size is the same
    assert main(["query", "--index", str(index), "verify"]) == 1
    err = capsys.readouterr().err
    assert "pairs/layer=0/head=1/part-" in err and ("sha256 differs" in err or "unreadable" in err), err


def test_a_deleted_partition_is_named(index, capsys):
    shutil.rmtree(index / "channels" / "layer=1" / "head=3")
    code = main(["query", "--index", str(index), "top-channels", "--layer", "1", "--head", "3"])
    err = capsys.readouterr().err
    assert code == 1 and "lacks the partition" in err and "channels/layer=1/head=3" in err and "(no rows)" not in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["top-channels", "--layer", "7", "--head", "0"], "--layer 7 is not indexed in .*; its layers are \\[0, 1\\]"),
        (
            ["top-channels", "--layer", "0", "--head", "9"],
            "--head 9 is not indexed in .*; its heads are \\[0, 1, 2, 3\\]",
        ),
        (["feature", "3", "--layer", "5"], "--layer 5 is not indexed"),
    ],
)
def test_queries_name_what_is_not_indexed(tiny_index, capsys, args, message):
    import re

    assert main(["query", "--index", str(tiny_index), *args]) == 1
    assert re.search(message, capsys.readouterr().err)


# ------------------------------------------------------------------------------ one-line errors


def fra(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fra", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
    )


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["ingest", "--max-samples", "0"], 2, "fra ingest: error: --max-samples must be positive"),
        (["ingest", "--memory-budget-gb", "1e-6"], 2, "fra ingest: error: --memory-budget-gb 1e-06 is below the floor"),
        (["ingest", "--max-samples", "x"], 2, "fra ingest: error: argument --max-samples: invalid int value: 'x'"),
        (["query", "--index", "{tmp}/nowhere", "heads"], 1, "fra query: error: {tmp}/nowhere is not an FRA index"),
        (["query", "heads", "--bogus"], 2, "fra query: error: unrecognized arguments: --bogus"),
        (["ingest", "--corpus", "{tmp}/none.parquet", "--out", "{tmp}/i"], 1, "none.parquet"),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, args, code, message):
    p = fra(*[a.format(tmp=tmp_path) for a in args])
    assert p.returncode == code, p.stderr
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr, p.stderr
    assert message.format(tmp=tmp_path) in p.stderr


def test_debug_shows_the_traceback(tmp_path):
    for p in (
        fra("query", "--index", str(tmp_path), "heads", "--debug"),
        fra("query", "--index", str(tmp_path), "heads", env={"FRA_DEBUG": "1"}),
    ):
        assert p.returncode == 1 and "Traceback" in p.stderr and "IndexFormatError" in p.stderr

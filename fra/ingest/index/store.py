"""Writing and opening an index directory.

`IndexWriter` stages everything in `<out>.staging/` and renames it into place when the job is
done, so a reader never sees half an index. The block partials (`blocks.py`) live in
`<out>.staging/partials/`; a layer counts as done when its marker exists. A killed job resumes:
finished layers and finished blocks are kept, the rest is recomputed (the result is identical
to an uninterrupted run). Tables are cast to the schemas of `schema.TABLES` on the way out.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import pyarrow as pa

from .schema import TABLES, IndexFormatError, Manifest


def fault_point(name: str) -> None:
    """Tests kill the job here with SIGKILL (like `kill -9`) when FRA_KILL_AT names this point."""
    if os.environ.get("FRA_KILL_AT") == name:
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def write_parquet(table: pa.Table, path: Path, row_group_size: int = 65536) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", row_group_size=row_group_size)


def conform(name: str, table: pa.Table) -> pa.Table:
    """`table` with exactly the columns of TABLES[name], in order and cast to their types."""
    schema = TABLES[name].schema
    missing = set(schema.names) - set(table.column_names)
    if missing:
        raise IndexFormatError(f"table {name} lacks columns {sorted(missing)}")
    return table.select(schema.names).cast(schema)


def open_index(root: Path) -> Manifest:
    """The validated manifest of an index (raises `IndexFormatError` with the reason)."""
    return Manifest.read(Path(root))


def check_can_write(out: Path, identity: dict) -> None:
    """Refuse to overwrite something that is not an index, or another model's or SAE's index."""
    out = Path(out)
    if not out.exists():
        return
    if not (out / "manifest.json").exists():
        if any(out.iterdir()):
            raise IndexFormatError(f"{out} exists, is not empty and is not an FRA index; choose another --out")
        return
    theirs = json.loads((out / "manifest.json").read_text())
    if theirs.get("model") != identity["model"] or theirs.get("sae") != identity["sae"]:
        raise IndexFormatError(
            f"{out} holds an index of model {theirs.get('model')} with SAEs {theirs.get('sae')}; this job "
            f"uses {identity['model']} with {identity['sae']}. Choose another --out or delete it."
        )


def staging_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".staging")


def partials_dir(out: Path) -> Path:
    """Where the block partials of the index at `out` are staged (`blocks.py`)."""
    return staging_dir(out) / "partials"


class IndexWriter:
    """One job's staging directory. `job` identifies the job: a staging directory left by the
    same job is resumed; one left by a different job is wiped, or refused with `keep_other`
    (shards of one job share the staging directory, and must not wipe each other's blocks)."""

    def __init__(self, out: Path, job: dict, keep_other: bool = False):
        self.out = Path(out)
        self.staging = staging_dir(out)
        self.job = job
        job_file = self.staging / "job.json"
        if self.staging.exists():
            prev = json.loads(job_file.read_text()) if job_file.exists() else None
            if prev != job and prev is not None and keep_other:
                diff = sorted(k for k in set(job) | set(prev) if job.get(k) != prev.get(k))
                raise IndexFormatError(
                    f"{self.staging} holds blocks of another job (it differs in {diff}); run every shard "
                    "with the same options and code, or delete that directory"
                )
            if prev != job:
                shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True, exist_ok=True)
        tmp = job_file.with_suffix(f".tmp-{uuid.uuid4().hex[:8]}")  # shards on other nodes write it too
        tmp.write_text(json.dumps(job, sort_keys=True))
        os.replace(tmp, job_file)

    @classmethod
    def resume(cls, out: Path) -> "IndexWriter":
        """The writer of the job staged for `out` (by `fra ingest --shard i/n` runs)."""
        job_file = staging_dir(out) / "job.json"
        if not job_file.exists():
            raise IndexFormatError(
                f"nothing is staged for {out} (no {job_file}); run `fra ingest --shard i/n "
                f"--out {out}` on each node first"
            )
        return cls(out, json.loads(job_file.read_text()))

    @property
    def partials(self) -> Path:
        return partials_dir(self.out)

    def _done(self, layer: int) -> Path:
        return self.staging / "_done" / f"layer={layer}.json"

    def work_dir(self, layer: int) -> Path:
        return self.staging / "_work" / f"layer={layer}"

    def layer_stats(self, layer: int) -> dict | None:
        """The stats of a finished layer, or None if it must be (re)computed."""
        done = self._done(layer)
        return json.loads(done.read_text()) if done.exists() else None

    def begin_layer(self, layer: int) -> None:
        """Remove any half-finished attempt at `layer`."""
        for name in TABLES:
            shutil.rmtree(self.staging / name / f"layer={layer}", ignore_errors=True)
        shutil.rmtree(self.work_dir(layer), ignore_errors=True)
        self.work_dir(layer).mkdir(parents=True)

    def write(
        self, name: str, table: pa.Table, layer: int | None = None, head: int | None = None, part: int = 0
    ) -> None:
        """One part file of a table: into the layer's work directory for partitioned tables."""
        if TABLES[name].partitioned:
            path = self.work_dir(layer) / name / f"layer={layer}" / f"head={head}" / f"part-{part:05d}.parquet"
        else:
            path = self.staging / name / f"part-{part}.parquet"
        write_parquet(conform(name, table), path)

    def finish_layer(self, layer: int, stats: dict) -> None:
        work = self.work_dir(layer)
        for name in TABLES:
            if (work / name / f"layer={layer}").exists():
                (self.staging / name).mkdir(exist_ok=True)
                os.replace(work / name / f"layer={layer}", self.staging / name / f"layer={layer}")
                fault_point(f"moved:{layer}:{name}")
        shutil.rmtree(work)
        done = self._done(layer)
        done.parent.mkdir(exist_ok=True)
        tmp = done.with_suffix(".tmp")
        tmp.write_text(json.dumps(stats))
        os.replace(tmp, done)
        fault_point(f"done:{layer}")

    def commit(self, manifest: Manifest) -> Path:
        """Write the manifest and move the staged index to `out` (replacing an older one)."""
        for extra in ("_done", "_work", "partials", "job.json"):
            p = self.staging / extra
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        manifest.write(self.staging)
        if self.out.exists():
            old = self.out.with_name(self.out.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.staging, self.out)
            shutil.rmtree(old)
        else:
            os.replace(self.staging, self.out)
        return self.out

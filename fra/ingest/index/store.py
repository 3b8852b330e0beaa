"""Writing, publishing and opening an index directory.

Layout while a job runs (`OUT.staging/` carries FRA's marker file, so FRA only ever deletes a
staging directory it made; anything else in its place is refused with its path):

    OUT.staging/.fra-staging   the marker
    OUT.staging/job.json       {"job": Job.to_json(), "commit": null | "publish"}
    OUT.staging/partials/      block partials (`blocks.py`), kept until the index is in place
    OUT.staging/_done/, _work/ finished layers, and the layer being merged
    OUT.staging/index/         the index being built: tables, then manifest.json

Commit protocol (`IndexWriter.commit`), each step one atomic filesystem operation:
  1. `index/manifest.json` is written (it lists every index file with its sha256 and rows);
  2. job.json records `"commit": "publish"`: from here the staged index is complete;
  3. an older index at OUT (an FRA index, or an empty directory) is renamed to OUT.staging/old;
  4. OUT.staging/index is renamed to OUT;
  5. OUT.staging is removed (the marker last).
A kill at any point leaves either the old state with the resume state intact (before 2), or a
complete staged index that `recover` publishes (2 to 5): `fra ingest`, `fra merge` and
`fra query/sql/export` call it first and say what they did. Nothing is deleted before the new
index is in place.

One writer per OUT: `OutLock` (a pid file next to OUT; a lock whose pid is dead is taken over).
Tables are cast to the schemas of `schema.TABLES` (with each column's description as Arrow
field metadata) on the way out.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path

import pyarrow as pa

from .job import Job
from .schema import PARTITIONED, TABLES, IndexFormatError, Manifest

MARKER = ".fra-staging"


def write_parquet(table: pa.Table, path: Path, row_group_size: int = 65536) -> None:
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    # no dictionary pages: feature ids and values are mostly distinct, and encoding them costs a
    # third of the writing time
    pq.write_table(table, path, compression="zstd", row_group_size=row_group_size, use_dictionary=False)


def conform(name: str, table: pa.Table) -> pa.Table:
    """`table` with exactly the columns of TABLES[name], in order, cast to their types, each
    field carrying its description (Arrow field metadata `description`)."""
    schema = TABLES[name].schema
    missing = set(schema.names) - set(table.column_names)
    if missing:
        raise IndexFormatError(f"table {name} lacks columns {sorted(missing)}")
    return table.select(schema.names).cast(schema)


# ---------------------------------------------------------------------------------------------
# file records: sha256 and row count of every file of a partial or an index


def file_record(path: Path) -> dict:
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    rows = pq.read_metadata(path).num_rows if path.suffix == ".parquet" else None
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size, "rows": rows}


def _listed(root: Path, skip: tuple[str, ...]) -> list[str]:
    """Relative paths of the files under root, except top-level names in `skip` and `_*` dirs."""
    out = []
    for p in sorted(Path(root).rglob("*")):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] not in skip and not any(part.startswith("_") for part in rel.parts[:-1]):
            out.append(rel.as_posix())
    return out


def record_files(root: Path, skip: tuple[str, ...] = ()) -> dict:
    return {rel: file_record(Path(root) / rel) for rel in _listed(root, skip)}


def check_files(root: Path, record: dict, full: bool, skip: tuple[str, ...] = ()) -> str | None:
    """Why the files under root differ from `record` (None when they match). Quick: every file
    present with its size, no unrecorded file. Full: also the sha256 and the Parquet row count."""
    root = Path(root)
    extra = sorted(set(_listed(root, skip)) - set(record))
    if extra:
        return f"{root / extra[0]} was not written by FRA (not in the file record)"
    for rel, want in record.items():
        path = root / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != want["bytes"]:
            return f"{path} has {path.stat().st_size} bytes, {want['bytes']} were written"
        if full:
            try:
                have = file_record(path)
            except Exception as exc:  # noqa: BLE001 - any unreadable footer is a corrupt file
                return f"{path} is unreadable ({type(exc).__name__}: {exc})"
            if have["sha256"] != want["sha256"]:
                return f"{path} changed after it was written (sha256 differs)"
            if have["rows"] != want["rows"]:
                return f"{path} has {have['rows']} rows, {want['rows']} were written"
    return None


MANIFEST_FILES = ("manifest.json", "manifest.tmp")  # not in the file record: the manifest holds it


def open_index(root: Path, full: bool = False) -> Manifest:
    """The manifest of an index, checked against the data (raises `IndexFormatError` naming the
    file): every recorded file present with its size (and its sha256 and row count with
    `full`), no unrecorded file, every (layer, head) of the manifest present in each partitioned
    table and no other, and its sample count the samples table's rows."""
    import pyarrow.parquet as pq

    root = Path(root)
    if not (root / "manifest.json").exists() and pending_commit(root):
        raise IndexFormatError(
            f"{root} is not in place: a complete index waits in {staging_dir(root)} after an interrupted "
            f"commit; `fra query --index {root} heads` (or the next fra ingest / fra merge) publishes it"
        )
    m = Manifest.read(root)
    for name in PARTITIONED:
        if not (root / name).is_dir():
            continue
        have = {_partition(p.relative_to(root / name)) for p in (root / name).glob("layer=*/head=*") if p.is_dir()}
        want = {(layer, head) for layer in m.layers for head in m.heads}
        if not have:  # a table partitioned by layer only
            have = {(_partition(p.relative_to(root / name))[0], None) for p in (root / name).glob("layer=*")}
            want = {(layer, None) for layer in m.layers}
        if have != want:
            lost, extra = sorted(want - have), sorted(have - want)
            what = (
                f"lacks the partition {root / name}/layer={lost[0][0]}/head={lost[0][1]}"
                if lost
                else f"holds layer {extra[0][0]} head {extra[0][1]}, not in the manifest"
            )
            data = f"layers {sorted({x[0] for x in have})}, heads {sorted({x[1] for x in have if x[1] is not None})}"
            raise IndexFormatError(
                f"the index at {root} {what}: its manifest says layers {m.layers}, heads {m.heads}, the data holds "
                f"{data}; rebuild it with fra ingest"
            )
    if m.files:  # indexes written by `fra ingest` record their files; hand-made fixtures may not
        why = check_files(root, m.files, full, skip=MANIFEST_FILES)
        if why is not None:
            raise IndexFormatError(f"{why}; the index at {root} does not match its manifest, rebuild it")
    samples = sorted((root / "samples").glob("*.parquet"))
    rows = sum(pq.read_metadata(f).num_rows for f in samples)
    if samples and rows != m.n_samples:
        raise IndexFormatError(
            f"{root / 'manifest.json'} says n_samples {m.n_samples}, but {root / 'samples'} holds {rows} rows"
        )
    return m


def reseal(root: Path) -> None:
    """Record the files of the index at `root` again, after an edit made on purpose (a test
    fixture, a hand repair): its manifest then vouches for the files as they are now."""
    import dataclasses

    m = Manifest.read(root)
    dataclasses.replace(m, files=record_files(root, skip=MANIFEST_FILES)).write(root)


def _partition(rel: Path) -> tuple[int, int | None]:
    parts = dict(p.split("=", 1) for p in rel.parts if "=" in p)
    return int(parts["layer"]), int(parts["head"]) if "head" in parts else None


# ---------------------------------------------------------------------------------------------
# the places of a job, and what may be replaced


def staging_dir(out: Path) -> Path:
    return Path(out).with_name(Path(out).name + ".staging")


def partials_dir(out: Path) -> Path:
    """Where the block partials of the index at `out` are staged (`blocks.py`)."""
    return staging_dir(out) / "partials"


def is_index(path: Path) -> bool:
    """An FRA index: a manifest.json that parses with a schema_version (of any version)."""
    try:
        return "schema_version" in json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return False


def check_out(out: Path, identity: dict | None = None) -> None:
    """Before anything is computed: OUT may be written and renamed into place, and replacing it
    loses nothing that FRA did not write. Refuses (naming the path) a non-index, an index of
    another model or SAEs (`identity`), a mount point, and a staging directory FRA did not make."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise IndexFormatError(f"--out {out} is a file, not a directory; choose another --out")
    if os.path.ismount(out):
        raise IndexFormatError(
            f"--out {out} is a mount point, which cannot be renamed; FRA publishes an index by renaming "
            f"it into place, so choose a directory inside it (e.g. {out / 'index'})"
        )
    if out.is_dir() and not is_index(out) and any(out.iterdir()):
        raise IndexFormatError(f"--out {out} exists, is not empty and is not an FRA index; choose another --out")
    if identity is not None and is_index(out):
        theirs = json.loads((out / "manifest.json").read_text())
        if theirs.get("model") != identity["model"] or theirs.get("sae") != identity["sae"]:
            raise IndexFormatError(
                f"--out {out} holds an index of model {theirs.get('model')} with SAEs {theirs.get('sae')}; this "
                f"job uses {identity['model']} with {identity['sae']}. Choose another --out or delete it."
            )
    staging = staging_dir(out)
    if staging.exists() and not _ours(staging):
        raise IndexFormatError(
            f"{staging} exists and was not made by FRA (no {MARKER} in it); FRA stages --out {out} there, "
            "so move that directory away or choose another --out"
        )
    parent = out.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise IndexFormatError(f"--out {out}: cannot create {parent} ({exc.strerror})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise IndexFormatError(f"--out {out}: {parent} is not writable, and OUT is published by a rename in it")


def _ours(staging: Path) -> bool:
    """FRA made this staging directory (or it is empty: nothing in it to lose)."""
    return (staging / MARKER).exists() or not any(staging.iterdir())


def make_staging(out: Path) -> Path:
    """OUT.staging with its marker: created under a temporary name and renamed, so a staging
    directory without the marker was never FRA's."""
    staging = staging_dir(out)
    if staging.exists():
        if not _ours(staging):
            raise IndexFormatError(f"{staging} exists and was not made by FRA (no {MARKER} in it); move it away")
        if (staging / MARKER).exists():
            return staging
        staging.rmdir()  # empty
    tmp = staging.with_name(f"{staging.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    (tmp / MARKER).write_text("made by fra ingest; deleted by FRA when the index is in place\n")
    try:
        os.rename(tmp, staging)
    except OSError:  # another shard made it first
        shutil.rmtree(tmp)
    return staging


def remove_staging(staging: Path) -> None:
    """Delete a staging directory that FRA made, its marker last (a staging directory found
    without its marker is then empty, and an empty one is safe to remove)."""
    staging = Path(staging)
    if not staging.exists():
        return
    if not _ours(staging):
        raise IndexFormatError(f"{staging} was not made by FRA (no {MARKER} in it); refusing to delete it")
    for p in staging.iterdir():
        if p.name not in (MARKER, "job.json"):
            _remove(p)
    _remove(staging / "job.json")  # the commit state goes last but the marker: a kill before leaves it to `recover`
    (staging / MARKER).unlink(missing_ok=True)
    staging.rmdir()


# The commit's filesystem steps. Each is one atomic operation (tests make each one the last).
def _replace(src: Path, dst: Path) -> None:
    os.replace(src, dst)


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        json.dump(data, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_state(staging: Path) -> dict | None:
    try:
        return json.loads((staging / "job.json").read_text())
    except (OSError, ValueError):
        return None


def pending_commit(out: Path) -> bool:
    state = _read_state(staging_dir(out))
    return state is not None and state.get("commit") == "publish"


def _publish(out: Path, staging: Path) -> None:
    """Steps 3 to 5 of the commit; each may already be done."""
    index, old = staging / "index", staging / "old"
    if index.exists():
        if out.exists() and not old.exists():
            if not (is_index(out) or not any(out.iterdir())):
                raise IndexFormatError(
                    f"--out {out} is now neither an FRA index nor empty; the complete index stays in {index}"
                )
            _replace(out, old)
        _replace(index, out)
    remove_staging(staging)


def recover(out: Path) -> str | None:
    """Finish an interrupted commit of OUT: a staged index that was complete is published.
    Returns what was done (None when nothing was pending)."""
    out = Path(out)
    staging = staging_dir(out)
    if staging.is_dir() and {p.name for p in staging.iterdir()} <= {MARKER} and is_index(out):
        remove_staging(staging)  # a cleanup killed after its last step but one: nothing left to do
    if not pending_commit(out):
        return None
    with OutLock(out):
        if not pending_commit(out):  # another process finished it meanwhile
            return None
        had = (staging / "index").exists()
        _publish(out, staging)
    if had:
        return f"finished an interrupted commit: the complete index staged in {staging} is now at {out}"
    return f"finished an interrupted commit: the index was already at {out}; removed {staging}"


# ---------------------------------------------------------------------------------------------
# one writer per OUT


class OutLock:
    """A pid file next to OUT (`OUT.lock`, or `OUT.shard-I-of-N.lock` for a shard): a second
    writer is refused with the first one's pid; the lock of a dead pid on this host is taken over."""

    def __init__(self, out: Path, shard: tuple[int, int] = (0, 1)):
        out = Path(out)
        i, n = shard
        suffix = ".lock" if n == 1 else f".shard-{i}-of-{n}.lock"
        self.path = out.with_name(out.name + suffix)
        self.held = False

    def __enter__(self) -> "OutLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and holder.get("pid") == me["pid"] and holder.get("host") == me["host"]:
                    return self  # re-entered by this process
                if holder is not None and (holder.get("host") != me["host"] or _alive(holder.get("pid"))):
                    raise IndexFormatError(
                        f"another fra process (pid {holder.get('pid')} on {holder.get('host')}) is writing "
                        f"{self.path.name[: -len('.lock')]}; wait for it, or delete {self.path} if it is gone"
                    ) from None
                # a stale lock (its process is dead) or an unreadable one: take it over
                stale = self.path.with_name(f"{self.path.name}.stale-{uuid.uuid4().hex[:8]}")
                try:
                    os.replace(self.path, stale)
                    stale.unlink()
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise IndexFormatError(f"could not take the lock {self.path}; delete it if no fra process is running")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ---------------------------------------------------------------------------------------------


class IndexWriter:
    """One job's staging directory. A staging directory left by the same job is resumed; one
    left by a different job is wiped (FRA made it), or refused with `keep_other` (shards of one
    job share it, and must not wipe each other's blocks)."""

    def __init__(self, out: Path, job: Job, keep_other: bool = False):
        self.out = Path(out)
        self.staging = staging_dir(out)
        self.job = job
        if self.staging.exists():
            state = _read_state(self.staging)
            prev = Job.from_json(state["job"]) if state is not None and "job" in state else None
            if prev is not None and prev != job and keep_other:
                raise IndexFormatError(
                    f"{self.staging} holds blocks of another job (it differs in {job.differences(prev)}); run "
                    "every shard with the same options and code, or delete that directory"
                )
            if prev != job:
                remove_staging(self.staging)
        make_staging(self.out)
        (self.staging / "index").mkdir(exist_ok=True)
        job_file = self.staging / "job.json"
        if _read_state(self.staging) != json.loads(json.dumps(self._state(None))):
            _write_json(job_file, self._state(None))  # shards on other nodes write the same

    def _state(self, commit: str | None) -> dict:
        return {"job": self.job.to_json(), "commit": commit}

    @classmethod
    def resume(cls, out: Path) -> "IndexWriter":
        """The writer of the job staged for `out` (by `fra ingest --shard i/n` runs)."""
        state = _read_state(staging_dir(out))
        if state is None or "job" not in state:
            raise IndexFormatError(
                f"nothing is staged for {out} (no {staging_dir(out) / 'job.json'}); run `fra ingest --shard i/n "
                f"--out {out}` on each node first"
            )
        return cls(out, Job.from_json(state["job"]))

    @property
    def partials(self) -> Path:
        return partials_dir(self.out)

    @property
    def index(self) -> Path:
        return self.staging / "index"

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
            shutil.rmtree(self.index / name / f"layer={layer}", ignore_errors=True)
        shutil.rmtree(self.work_dir(layer), ignore_errors=True)
        self.work_dir(layer).mkdir(parents=True)

    def write(
        self, name: str, table: pa.Table, layer: int | None = None, head: int | None = None, part: int = 0
    ) -> None:
        """One part file of a table: into the layer's work directory for partitioned tables."""
        if TABLES[name].partitioned:
            path = self.work_dir(layer) / name / f"layer={layer}" / f"head={head}" / f"part-{part:05d}.parquet"
        else:
            path = self.index / name / f"part-{part}.parquet"
        write_parquet(conform(name, table), path)

    def finish_layer(self, layer: int, stats: dict) -> None:
        work = self.work_dir(layer)
        for name in TABLES:
            if (work / name / f"layer={layer}").exists():
                (self.index / name).mkdir(exist_ok=True)
                _replace(work / name / f"layer={layer}", self.index / name / f"layer={layer}")
        shutil.rmtree(work)
        done = self._done(layer)
        done.parent.mkdir(exist_ok=True)
        _write_json(done, stats)

    def commit(self, manifest: Manifest) -> Path:
        """Record every index file in the manifest, write it, and publish the index at `out`
        (the protocol in the module docstring)."""
        import dataclasses

        manifest = dataclasses.replace(manifest, files=record_files(self.index, skip=MANIFEST_FILES))
        manifest.write(self.index)
        _write_json(self.staging / "job.json", self._state("publish"))
        _publish(self.out, self.staging)
        return self.out

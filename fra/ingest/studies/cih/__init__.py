"""Conceptual Induction Heads (CIH): induction inside single SAE feature-pair channels.

Question. When a prompt says "... the A X ... the B" and B is related to A (a synonym, a
translation, or an orthographic variant), does a head attend from B to X (the token after A)
more than when A is replaced by an unrelated word, and is that extra attention carried by
identifiable feature-pair channels (i at B, j at X)? H1: every token induction head (TIH) of the
studied layers carries such a channel. H2: heads outside the TIH set do too.

Modules, in data-flow order:
- config.py    CIHConfig, the one frozen config (`fra report cih` maps onto it).
- prompts.py   relations, templates (noun-X and function-X families, each split into selection
               and held-out halves), frequency-matched controls, anchor swaps, the placebo
               relation, word-disjoint pair split, tokenisation checks.
- measure.py   the query row of one prompt decomposed: four term groups that sum to
               hook_attn_scores, per-channel contributions, feature marginals, removals (pure
               tensor functions).
- study.py     runs the model: per pair, units selected on its selection templates and measured
               on its held-out templates; flat records.
- stats.py     sign-flip and permutation tests, Benjamini-Hochberg, intervals.
- analysis.py  tests, the positive control, verdicts, H1/H2 answers, behaviour, channel families
               (pure functions on DataFrames).
- schema.py    the dataclasses of cih.json (standard library only: the explorer reads it).
- report.py    report.md (one function per section), the figures and the Parquet tables.
- pipeline.py  the whole run.
"""

from .config import CIHConfig

__all__ = ["CIHConfig", "run"]


def run(cfg: CIHConfig, progress: bool = True):
    from .pipeline import run as _run

    return _run(cfg, progress)

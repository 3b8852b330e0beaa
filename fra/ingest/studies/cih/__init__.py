"""Conceptual Induction Heads (CIH): induction inside single SAE feature-pair channels.

Question. When a prompt says "... the A X ... the B" and B is related to A (a synonym, a
translation, or an orthographic variant), does a head attend from B to X (the token after A)
more than when A is replaced by an unrelated word, and is that extra attention carried by
identifiable feature-pair channels (i at B, j at X)? H1: every token induction head (TIH) of the
studied layers carries such a channel. H2: heads outside the TIH set do too.

Modules, in data-flow order:
- config.py    CIHConfig, the one frozen config (`fra report cih` maps onto it).
- prompts.py   relations, templates (half selection-only, half test-only), frequency-matched
               controls, the placebo relation, tokenisation checks.
- measure.py   the query row of one prompt decomposed: four term groups that sum to
               hook_attn_scores, and per-channel contributions over keys (pure tensor functions).
- stats.py     sign-flip tests, Benjamini-Hochberg, intervals.
- analysis.py  head contrasts, unit tests, the combined criterion, gating labels, causal drops,
               aggregation over seeds and the H1/H2 answers (pure functions on measured rows).
- results.py   the frozen result records.
- study.py     runs the model over the prompts; selection then test, per relation and seed.
- report.py    report.md, cih.json (its "findings" key feeds the explorer) and the figures.
"""

from .config import CIHConfig

__all__ = ["CIHConfig", "run"]


def run(cfg: CIHConfig, progress: bool = True):
    from .study import run as _run

    return _run(cfg, progress)

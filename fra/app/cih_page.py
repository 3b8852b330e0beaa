"""The CIH page: the study's answers first, then the positive control, the verdicts per head and
the units as objects of their own, from cih.json (fra.ingest.studies.cih.schema, standard library
only, so the app still never imports torch). Feature labels are the report's own; links go only to
layers the open index holds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from fra.app import ui
from fra.app.glossary import HELP
from fra.ingest.studies.cih import schema

UNIT_TEXT = {
    "channel": "per-pair channel groups",
    "query": "per-pair query-feature marginals",
    "key": "per-pair key-feature marginals",
    "fixed": "fixed channels (one set for every pair)",
}
COLUMN_HELP = {
    "relation": HELP["relation"],
    "unit": "The unit of analysis: a pair's top channels, its top query / key feature marginals, or fixed channels.",
    "h1": "H1: every token induction head (TIH) of the studied layers holds (passes in >= min_pass seeds).",
    "h1_matching": "H1 counting only units whose positive contrast is at least half in 'matching' units.",
    "tih_holding": "The TIH that hold.",
    "tih_holding_matching": "The TIH that hold with matching units only.",
    "h2": "H2: heads outside the TIH that hold.",
    "h2_matching": "H2 with matching units only.",
    "passes": "Identity (B = A) holds in every TIH with this unit: the positive control.",
    "passes_matching": "The positive control with matching units only.",
    "tih_passing": "The TIH in which identity holds.",
    "share_held_out": "Share of the feature x feature contrast carried by the unit group on held-out templates.",
    "share_in_sample": "The same share, ranked and measured on the same prompt pair (an upper bound).",
    "name": "The head, as layer.head.",
    "tih": "A token induction head (from the census).",
    "n_pass": "Seeds in which the unit passes the criterion in this head.",
    "n_seeds": "Seeds run.",
    "share": "The unit's held-out share of the head's own conceptual-minus-control contrast.",
    "contrast": "The unit's held-out conceptual-minus-control margin contrast (mean over pairs).",
    "frac_matching": "Share of the unit's positive contrast in matching units.",
    "attn_drop": "Drop of attention on X when the unit is removed from the head's scores at B.",
    "attn_drop_random": "The same for random channels matched on their contribution at X.",
    "attn_drop_error": "The same for the head's SAE-error terms.",
    "feat_q": "The query-side feature (at B); 'all' for a key-feature marginal.",
    "feat_k": "The key-side feature (at X); 'all' for a query-feature marginal.",
    "label_q": "The query feature's label, as the report gives it.",
    "label_k": "The key feature's label, as the report gives it.",
    "n_pairs": "Distinct word pairs whose group selects this unit.",
    "swap_ratio": "Anchor-swap contrast / contrast: near 1 means it does not need A before X.",
    "label": "The commonest gating label (matching, gated query, ungated, weak).",
    "cls": "structural / recurrent / content, pair-specific / other (report section 7).",
    "x_kind": "noun: X is a noun after A; function: X is the template's punctuation or function word.",
    "d_logp": "log P(X) after B, conceptual minus control (mean over pairs).",
    "d_logp_lo": "Lower end of the 95% interval.",
    "d_logp_hi": "Upper end of the 95% interval.",
    "d_logp_swap": "log P(X), anchor swap minus control.",
    "open": "Opens the head, channel or feature in this index (only for layers the index holds).",
}


def _table(rows: list, cols: list[str], key: str, links=None) -> None:
    df = pd.DataFrame([vars(r) for r in rows])
    if df.empty:
        st.info("None.")
        return
    if links is not None:
        df["open"] = [links(r) for r in rows]
        cols = cols + ["open"]
    for c in ("feat_q", "feat_k"):
        if c in df:
            df[c] = [str(int(v)) if v >= 0 else "all" for v in df[c]]
    ui.show_table(df, cols, key, feature_cols=(), helps={c: COLUMN_HELP.get(c, HELP.get(c, c)) for c in cols})


def page_cih() -> None:
    st.header("CIH: conceptual induction heads")
    path = ui.cih_report_path()
    if not path.exists():
        st.info(f"No CIH report at {path}. Run `fra report cih` first (or set FRA_CIH_REPORT).")
        return
    try:
        res = schema.load(path)
    except ValueError as exc:
        st.error(f"Cannot read the CIH report: {exc}")
        return
    indexed = set(ui.layers_heads())
    unit = res.chosen_unit
    st.subheader("Answers")
    if unit is None:
        st.error(
            "The instrument fails its positive control: no unit resolves token repetition (identity) in every "
            "token induction head, so the report answers neither H1 nor H2."
        )
    else:
        st.success(f"The positive control passes with {UNIT_TEXT.get(unit, unit)} (unit '{unit}'); the answers use it.")
        _table(
            [a for a in res.answers if a.unit == unit],
            ["relation", "relation_kind", "h1", "tih_holding", "h1_matching", "h2", "h2_matching"],
            "cih_answers",
        )
    st.caption(f"TIH of layers {', '.join(map(str, res.layers))}: {', '.join(res.tih)}. Seeds: {len(res.seeds)}.")
    st.markdown("**Behaviour**: does the model predict X after B more when A is B's relative?")
    _table(
        [b for b in res.behaviour if b.x_kind == "all"],
        ["relation", "n_pairs", "d_logp", "d_logp_lo", "d_logp_hi", "d_logp_swap"],
        "cih_behaviour",
    )

    st.subheader("Positive control")
    _table(
        res.positive_control,
        ["unit", "passes", "passes_matching", "tih_passing", "share_held_out", "share_in_sample"],
        "cih_positive",
    )
    fig = Path(path).parent / "concentration.png"
    if fig.exists():
        st.image(str(fig), caption="How concentrated token induction is, per unit kind (report section 1)")

    st.subheader("Verdicts per head")
    units = sorted({v.unit for v in res.verdicts})
    if units:
        pick = ui.choose(st, "unit", "unit", units, unit if unit in units else units[0], "cih_unit")
        rows = [v for v in res.verdicts if v.unit == pick and (v.tih or v.n_pass > 0)]

        def head_link(v):
            return ui.link("Head", layer=v.layer, head=v.head) if v.layer in indexed else None

        _table(
            rows,
            ["relation", "name", "tih", "n_pass", "n_seeds", "share", "contrast", "frac_matching", "attn_drop",
             "attn_drop_random", "attn_drop_error"],
            "cih_verdicts",
            head_link,
        )  # fmt: skip

    st.subheader("Units as objects of their own")

    def unit_link(c):
        if c.layer not in indexed:
            return None
        if c.feat_q >= 0 and c.feat_k >= 0:
            h = int(c.heads.split(",")[0].split(".")[1])
            return ui.channel_link(c.layer, h, c.feat_q, c.feat_k)
        return ui.feature_link(c.layer, c.feat_q if c.feat_q >= 0 else c.feat_k)

    _table(
        res.channels,
        ["layer", "feat_q", "label_q", "feat_k", "label_k", "heads", "n_pairs", "swap_ratio", "label", "cls"],
        "cih_units",
        unit_link,
    )
    missing = sorted(set(res.layers) - indexed)
    if missing:
        st.caption(f"Layers {', '.join(map(str, missing))} are not in this index, so their rows have no link.")
    st.caption(f"The full report, with every test: {Path(path).parent / 'report.md'}")
    ui.glossary("CIH")

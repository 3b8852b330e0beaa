"""The explorer's pages. Each reads the index only through named queries (`ui.q`) and keeps its
state in the URL (`ui.select_int` and friends); clicks on table cells and on the attention map
navigate in the same tab (see fra.app.ui)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from fra.app import ui
from fra.app.glossary import HELP
from fra.app.state import pick_int
from fra.app.text import html_tokens, md_context, md_text, md_tokens

MIN_COUNT = 8  # channels seen fewer times are too noisy to rank
RANKINGS = {
    "total": "|summed FA| (total contribution)",
    "share": "|share of the head's feature x feature part|",
    "mean": "|mean-when-active|",
}


def _feature_ref(layer: int, f: int) -> str:
    """`123 "label"` as Markdown (the link is drawn next to it with ui.nav)."""
    lab = ui.label_of(layer, f)
    return f"**{f}**" + (f" {md_text(lab)}" if lab else "")


def min_count() -> int | None:
    """The index's --min-count (channels seen fewer times are not stored)."""
    return (ui.manifest().get("policy") or {}).get("min_count")


def ranking_controls(page_key: str) -> tuple[str, bool]:
    c1, c2 = st.columns([3, 2])
    by = ui.choose(
        c1,
        "rank channels by",
        "rank",
        list(RANKINGS),
        "total",
        f"{page_key}_rank",
        help="total: the channel's FA summed over the corpus (what it adds to the head in all); share: the "
        "same divided by the head's summed feature x feature part; mean: mean-when-active (favours rare "
        "channels).",
    )
    no_self = ui.toggle(
        c2,
        "exclude self pairs",
        "noself",
        True,
        f"{page_key}_noself",
        help="Drop channels whose query and key feature are the same feature: they fire mostly at q = k "
        "(a token attending to itself) and crowd the list.",
    )
    return by, no_self


# ------------------------------------------------------------------------------ Home


def page_home(meta: dict) -> None:
    st.header("Home: the strongest channels of this index")
    st.markdown(
        "FRA splits every attention score exactly into SAE feature-pair terms (**FA**). A **channel** is one "
        "(query feature, key feature) pair of one head. Click a row below to open its channel, a feature id to "
        "open the feature; or search a feature by id, label or token text on Feature search, or open a head's "
        "attention map on Head (sidebar)."
    )
    heads = meta.get("heads")
    st.markdown(
        f"**Index**: model `{meta.get('model')}`, layers {', '.join(str(l) for l in meta.get('layers', []))}, "
        f"{heads if isinstance(heads, int) else len(heads or [])} heads per layer, {meta.get('n_samples')} samples."
    )
    st.subheader("Strongest channels across heads")
    by, no_self = ranking_controls("home")
    st.caption(
        f"By {RANKINGS[by]} over channels seen at least {MIN_COUNT} times, BOS and punctuation features dropped"
        f"{', self pairs dropped' if no_self else ''}; at most 5 per head."
    )
    top = ui.q("ranked_channels", None, None, by, MIN_COUNT, True, no_self, 5, 30)
    if top.empty:
        st.info(f"No channel of this index is seen {MIN_COUNT} times or more; the index is too small to rank channels.")
    else:
        top = ui.with_labels(top, "layer")
        top["open"] = [ui.channel_link(r.layer, r.head, r.feat_q, r.feat_k) for r in top.itertuples()]
        ui.show_table(
            top,
            [
                "layer",
                "head",
                "feat_q",
                "label_q",
                "feat_k",
                "label_k",
                "count",
                "sum",
                "share_of_head",
                "mean",
                "ind_diff",
                "open",
            ],
            "strongest_channels",
            layer="layer",
        )
    st.subheader("Heads")
    summ = ui.q("head_summary")
    summ["open"] = [ui.link("Head", layer=r.layer, head=r.head) for r in summ.itertuples()]
    ui.show_table(
        summ,
        [
            "layer",
            "head",
            "ff_share",
            "err_share",
            "bdec_resid_share",
            "kept_abs_share",
            "ind_attn",
            "ind_score_gap",
            "open",
        ],
        "heads",
    )
    ui.glossary("Home")


# ------------------------------------------------------------------------------ Feature search


def _is_list(v) -> bool:
    """A list cell from DuckDB (list or numpy array); NULL comes back as None or pd.NA."""
    return isinstance(v, (list, tuple)) or hasattr(v, "tolist")


def _search(layer: int, text: str) -> None:
    f = ui.features(layer)
    needle = text.strip().lower()
    if f["label"].isna().all() and ("top_contexts" not in f or f["top_contexts"].isna().all()):
        st.warning(
            f"{text!r} is not a feature ID, and this index has no feature labels or contexts to search "
            f"(its SAE shipped none). Type a feature ID from 0 to {len(f) - 1}."
        )
        return
    in_label = f["label"].fillna("").str.lower().str.contains(needle, regex=False)
    tokens = (
        f["top_contexts"].apply(
            lambda cs: sum(
                1 for c in (cs if _is_list(cs) else []) if f"[[{needle}]]" in str(c).lower().replace("[[ ", "[[")
            )
        )
        if "top_contexts" in f
        else pd.Series(0, index=f.index)
    )
    hits = f[in_label | (tokens > 0)].assign(token_hits=tokens[in_label | (tokens > 0)])
    hits = hits.sort_values(["token_hits", "index_frequency"], ascending=False)
    st.info(
        f"{text!r} is not a feature ID, so FRA searched the labels and the top-activating tokens of layer "
        f"{layer}: {len(hits)} features match."
    )
    if len(hits):
        hits = hits.drop(columns=["label"]).rename(columns={"label_text": "label"})
        ui.show_table(
            hits.head(200),
            ["feature", "label", "token_hits", "index_frequency", "frequency"],
            f"search_{layer}",
            layer=layer,
        )


def _activations(layer: int, feature: int) -> None:
    """Neuronpedia's view of a feature on the indexed samples: how strongly it fires, where, and on what."""
    if not ui.has("activations"):
        st.info(
            "This index has no `activations` table (`fra explain --index PATH` adds it), so the feature's "
            "activations on the indexed samples (histogram, coloured contexts, where it fires) cannot be shown. "
            "Rebuild the index to see them."
        )
        return
    acts = ui.q("feature_activations", layer, feature)
    if acts.empty:
        st.info(f"Feature {feature} never fires on the indexed samples.")
        return
    n_tok = int(ui.samples()["n_tokens"].sum())
    st.markdown(
        f"**On the indexed samples**: fires on {len(acts)} of {n_tok} tokens ({len(acts) / max(n_tok, 1):.2%}), "
        f"in {acts['sample'].nunique()} samples; largest activation {acts['act'].max():.3g}."
    )
    c1, c2 = st.columns(2)
    hist = go.Figure(go.Histogram(x=acts["act"], nbinsx=40, marker_color="#2b8cbe"))
    hist.update_layout(
        title="Activation histogram (tokens where it fires)",
        height=300,
        margin=dict(l=10, r=10, t=40, b=10),
        xaxis_title="activation",
        yaxis_title="tokens",
    )
    c1.plotly_chart(hist, width="stretch")
    where = go.Figure(
        go.Scatter(
            x=acts["pos"],
            y=acts["sample"].astype(str),
            mode="markers",
            marker=dict(color=acts["act"], colorscale="Blues", showscale=True, size=8, line=dict(width=0.5)),
            hovertemplate="sample %{y}, position %{x}<br>activation %{marker.color:.3g}<extra></extra>",
        )
    )
    where.update_layout(
        title="Where it fires (sample by position)",
        height=300,
        margin=dict(l=10, r=10, t=40, b=10),
        xaxis_title="position",
        yaxis_title="sample",
    )
    c2.plotly_chart(where, width="stretch")
    top = acts.head(10)
    by_sample = ui.q("sample_feature_acts", layer, feature, sorted({int(s) for s in top["sample"]}))
    amax = float(acts["act"].max()) or 1.0
    st.markdown(
        "**Top activations in the indexed samples** (each token coloured by this feature's activation, its value "
        "under it; the top token outlined; hover a token for its position)"
    )
    lines = []
    for r in top.itertuples():
        toks = ui.sample_tokens(int(r.sample))
        lo, hi = max(0, int(r.pos) - 12), min(len(toks), int(r.pos) + 5)
        mine = by_sample[by_sample["sample"] == r.sample]
        a = {int(p): float(v) for p, v in zip(mine["pos"], mine["act"]) if lo <= p < hi}
        html = html_tokens(
            toks[lo:hi],
            {p - lo: v / amax for p, v in a.items()},
            titles={p - lo: f"position {p}" for p in range(lo, hi)},
            outline={int(r.pos) - lo: "top"},
            values={p - lo: f"{v:.2g}" for p, v in a.items()},
        )
        lines.append(f"<div><small>sample {int(r.sample)}, position {int(r.pos)}, act {r.act:.3g}</small>{html}</div>")
    st.markdown("".join(lines), unsafe_allow_html=True)


def _feature_channels(layer: int, feature: int) -> None:
    limit = 20000
    chans = ui.q("feature_channels", feature, layer, 1, limit)
    if chans.empty:
        st.info(
            "This feature appears in no stored channel of this index: no pair it forms is seen at least "
            f"{min_count()} times (the index's min_count) in the indexed samples."
        )
        return
    chans["partner"] = np.where(chans["side"] == "key", chans["feat_q"], chans["feat_k"])
    chans["open"] = [ui.channel_link(r.layer, r.head, r.feat_q, r.feat_k) for r in chans.itertuples()]
    chans = ui.with_labels(chans, "layer", cols=("partner",))
    chans["abs_mean"] = chans["mean"].abs()
    cols = ["head", "feat_q", "feat_k", "partner_label", "count", "sum", "mean", "share_of_head", "ind_diff", "open"]
    for side, label in (("query", "as the query feature"), ("key", "as the key feature")):
        mine = ui.q("feature_side_channels", feature, layer, side, 15)
        st.markdown(f"**Strongest channels {label}** (by |summed FA| over the corpus, all heads)")
        if mine.empty:
            st.caption(f"No stored channel has this feature {label}.")
            continue
        mine["partner"] = mine["feat_k"] if side == "query" else mine["feat_q"]
        mine["open"] = [ui.channel_link(r.layer, r.head, r.feat_q, r.feat_k) for r in mine.itertuples()]
        mine = ui.with_labels(mine, "layer", cols=("partner",))
        ui.show_table(mine, cols, f"feature_{layer}_{feature}_{side}", layer="layer")
    many = f"The {limit} channels of largest |mean|" if len(chans) == limit else f"All {len(chans)} channels"
    with st.expander(f"{many} of this feature (by |mean|, the first 500 shown)"):
        ui.show_table(
            chans.sort_values("abs_mean", ascending=False).head(500),
            ["side", "head", "feat_q", "feat_k", "partner_label", "count", "mean", "share_of_head", "ind_diff", "open"],
            f"feature_{layer}_{feature}_channels",
            layer="layer",
        )


def page_feature() -> None:
    st.header("Feature search")
    lh = ui.layers_heads()
    layers = sorted(lh)
    c1, c2 = st.columns([2, 1])
    d = ui.indexed_layer("feature", lh, layers[0])
    layer = ui.select_int(c2, "layer", "layer", layers, d, "layers of this index", "feature_layer")
    if st.session_state.get("_adopt") or "feature_id" not in st.session_state:
        st.session_state["feature_id"] = str(ui.url_param("feature", ""))
    raw = c1.text_input(
        "feature ID, label or token text",
        key="feature_id",
        help="A whole number opens that feature; any other text searches labels and top tokens.",
    )
    raw = raw.strip()
    ui.url()["feature"] = raw
    if not raw:
        st.info("Type a feature ID (such as 123), or words from a label or a token (such as 'the'), to find features.")
        ui.glossary("Feature search")
        return
    try:
        feature = int(raw)
    except ValueError:
        _search(layer, raw)
        ui.glossary("Feature search")
        return
    f = ui.features(layer)
    if feature not in f.index:
        st.warning(f"Feature {feature} does not exist in layer {layer}: this SAE has features 0 to {len(f) - 1}.")
        return
    row = f.loc[feature]
    st.subheader(f"Feature {feature} (layer {layer}): {row['label_text'] or 'no label'}")
    cols = st.columns(4)
    for c, (name, fmt) in zip(
        cols, (("index_frequency", "{:.3%}"), ("bos_rate", "{:.0%}"), ("frequency", "{:.3%}"), ("max_act", "{:.3g}"))
    ):
        if name in row and row[name] == row[name]:
            c.metric(name, fmt.format(row[name]), help=HELP.get(name))
    _activations(layer, feature)
    contexts = row.get("top_contexts") if "top_contexts" in row else None
    if _is_list(contexts) and len(contexts):
        st.markdown("**Top-activating held-out contexts** (from the SAE's feature table; the activating token in bold)")
        st.markdown("\n".join("- " + md_context(c) for c in list(contexts)[:10]), unsafe_allow_html=True)
    _feature_channels(layer, feature)
    ui.glossary("Feature search")


# ------------------------------------------------------------------------------ Head (attention map)


def default_query(pat: pd.DataFrame, T: int) -> int:
    """The query that attends most to an induction target (the clearest case to look at), else the last."""
    ind = pat[pat["induction"]]
    return int(ind.sort_values("prob", ascending=False)["q"].iloc[0]) if len(ind) else T - 1


def most_attended_key(pat: pd.DataFrame, qpos: int) -> int:
    """The key (other than BOS, when there is one) that query `qpos` attends to most."""
    at_q = pat[pat["q"] == qpos].sort_values(["prob", "k"], ascending=[False, True])
    non_bos = at_q[at_q["k"] > 0]
    return int(non_bos["k"].iloc[0]) if len(non_bos) else 0


def _stored(layer: int, head: int, df: pd.DataFrame) -> pd.Series:
    """Per pair row: the channel's count if it is a stored channel of the head, else NaN."""
    if df.empty:
        return pd.Series([], dtype=float)
    st_ = ui.q("stored_channels_among", layer, head, [int(x) for x in df["feat_q"]], [int(x) for x in df["feat_k"]])
    counts = {(int(a), int(b)): int(c) for a, b, c in zip(st_["feat_q"], st_["feat_k"], st_["count"])}
    return pd.Series([counts.get((int(a), int(b)), np.nan) for a, b in zip(df["feat_q"], df["feat_k"])], index=df.index)


def _open_or_why(layer: int, head: int, df: pd.DataFrame) -> list[str]:
    """An 'open' link for the pairs that are stored channels; for the others, why there is none."""
    mc = min_count()
    return [
        ui.channel_link(layer, head, r.feat_q, r.feat_k)
        if r.channel_count == r.channel_count
        else f"not stored (count < {mc})"
        for r in df.itertuples()
    ]


def _channel_here(layer, head, sample, qpos, kpos, fq, fk, terms: pd.DataFrame) -> None:
    """The channel the user came from, at this (q, k): its own FA and its rank among the pairs."""
    lab = f"channel {fq} → {fk}"
    pairs = terms[terms["kind"] == "pair"] if len(terms) else terms
    mine = pairs[(pairs["feat_q"] == fq) & (pairs["feat_k"] == fk)] if len(pairs) else pairs
    at = ui.q("channel_at", layer, head, fq, fk, sample, qpos, kpos)
    if len(mine):
        r = mine.iloc[0]
        st.success(
            f"The {lab} you came from gives FA = {r['value']:+.4f} here: rank {int(r['rank']) + 1} of the "
            f"{len(pairs)} strongest feature pairs at this (q, k) (by |FA|)."
        )
    elif len(at):
        v = float(at["value"].iloc[0])
        tail = (
            f"; it is not among the {len(pairs)} strongest pairs stored here (each of them has |FA| >= "
            f"{pairs['value'].abs().min():.4f})"
            if len(pairs)
            else ""
        )
        st.info(f"The {lab} you came from gives FA = {v:+.4f} here{tail}.")
    elif len(pairs):
        st.info(
            f"The {lab} you came from is not among the {len(pairs)} strongest pairs stored at this (q, k) "
            f"(its |FA| here is below {pairs['value'].abs().min():.4f}, or it is not active here)."
        )
    else:
        st.info(f"The index does not store the {lab}'s FA at this (q, k) (it is not an example of that channel).")


def _explain(layer: int, head: int, sample: int, qpos: int, kpos: int, toks: list[str], pairs: pd.DataFrame) -> None:
    """Why q attends to k: the score's exact split, the strongest feature pairs there, and the
    channel the user came from (fq, fk in the URL)."""
    st.subheader(f"Why query {qpos} «{md_text(toks[qpos])}» attends to key {kpos} «{md_text(toks[kpos])}»")
    p = pairs[(pairs["q"] == qpos) & (pairs["k"] == kpos)]
    if p.empty:
        st.info(f"The index holds no score for (q={qpos}, k={kpos}) of sample {sample} (k must be at most q).")
        return
    p = p.iloc[0]
    score = float(p["score"])
    has_terms = ui.has("example_terms")
    terms = ui.q("example_terms_at", layer, head, sample, qpos, kpos) if has_terms else pd.DataFrame()
    fq, fk = st.session_state.get("head_channel", (None, None))
    if fq is not None:
        _channel_here(layer, head, sample, qpos, kpos, fq, fk, terms)
        ui.url().update(fq=fq, fk=fk)
    top_keys = (ui.manifest().get("policy") or {}).get("top_keys")
    if len(terms):
        top = terms[terms["kind"] == "pair"].copy()
        groups = terms[~terms["kind"].isin(["pair", "score"])].copy()
        order = {k: i for i, k in enumerate(ui.TERM_ORDER)}
        groups = groups.sort_values("kind", key=lambda c: c.map(lambda k: order.get(k, len(order))), kind="stable")
        st.caption(
            f"This (q, k) is a stored example: its {len(top)} strongest feature pairs and the rest of the score, "
            "exact (they sum to the score)."
        )
        shown = top.head(6)
        steps = pd.DataFrame(
            {
                "name": [f"{a}→{b}" for a, b in zip(shown["feat_q"], shown["feat_k"])]
                + (["other stored pairs"] if len(top) > len(shown) else [])
                + list(groups["kind"]),
                "value": list(shown["value"])
                + ([float(top["value"].iloc[len(shown) :].sum())] if len(top) > len(shown) else [])
                + list(groups["value"]),
            }
        )
        st.plotly_chart(
            ui.waterfall(steps, score, f"The score {score:.3f} as the sum of its terms (feat_q→feat_k pairs first)"),
            width="stretch",
        )
    else:
        top = ui.q("query_rows", layer, head, sample, qpos)
        top = top[top["k"] == kpos].copy()
        if not has_terms:
            why = (
                "This index has no `example_terms` table (`fra explain --index PATH` adds it), so it stores "
                f"feature pairs only where k is one of the query's {top_keys} most-attended keys"
            )
        else:
            why = (
                "This (q, k) is not a stored example of any channel, so the index stores its feature pairs only "
                f"if k is one of the query's {top_keys} most-attended keys"
            )
        st.info(
            why
            + (
                f"; here it stores {len(top)} pairs, listed below."
                if len(top)
                else "; it stores none for this (q, k). The exact split of the score into its parts is below."
            )
        )
        steps = pd.DataFrame(
            {
                "name": [
                    "feature x feature",
                    "f x b_dec",
                    "b_dec x f",
                    "f x error",
                    "error x f",
                    "resid x resid",
                    "bias",
                ],
                "value": [float(p[t]) for t in ("ff", "f_bdec", "bdec_f", "f_err", "err_f", "resid_resid", "bias")],
            }
        )
        st.plotly_chart(ui.waterfall(steps, score, f"The score {score:.3f} as the sum of its parts"), width="stretch")
    if len(top):
        top["channel_count"] = _stored(layer, head, top)
        top["open"] = _open_or_why(layer, head, top)
        top = ui.with_labels(top, layer)
        ui.show_table(
            top,
            ["feat_q", "label_q", "feat_k", "label_k", "value", "channel_count", "open"],
            f"pairs_{layer}_{head}_{sample}_{qpos}_{kpos}",
            layer=layer,
            helps={
                "channel_count": "The channel's count if the index stores it; empty: below the index's min_count.",
                "open": "Open the channel; pairs seen fewer than min_count times are not stored, so have no page.",
            },
        )


def _marginals(layer: int, head: int) -> None:
    st.subheader(f"Which features carry head {layer}.{head}'s attention")
    st.caption(
        "Channel sums added up over one side (exact, from the stored channels): the query features and the key "
        "features with the largest summed FA. Single channels are diffuse; these are not."
    )
    c1, c2 = st.columns(2)
    for col, name, fcol, side in ((c1, "query_marginals", "feat_q", "query"), (c2, "key_marginals", "feat_k", "key")):
        with col:
            m = ui.q(name, layer, head, 12)
            m = ui.with_labels(m, layer, cols=(fcol,))
            st.markdown(f"**As the {side} feature**")
            ui.show_table(
                m,
                [fcol, f"{'label_q' if side == 'query' else 'label_k'}", "n_channels", "total", "share_of_head"],
                f"marginal_{side}_{layer}_{head}",
                layer=layer,
                open_col=None,
                helps={
                    "n_channels": "Stored channels with this feature on this side.",
                    "total": "Their summed FA over the corpus (exact).",
                    "share_of_head": "total / the head's summed channel FA.",
                },
            )


def _on_q_change() -> None:
    st.session_state["_head_q_changed"] = True


def _on_cell_click(key: str) -> None:
    cell = ui.clicked_cell(key)
    if cell:
        st.session_state["head_q"], st.session_state["head_k"] = cell


def _head_channel(layer: int, head: int) -> None:
    """fq / fk in the URL: the channel the user came from, shown at each (q, k) until the head changes."""
    if st.session_state.get("_adopt") or "head_channel" not in st.session_state:
        n = len(ui.features(layer))
        picks = [pick_int(ui.url_param(p), p, range(n), -1, f"features of layer {layer}") for p in ("fq", "fk")]
        ok = all(pk.value >= 0 and not pk.problem for pk in picks)
        for pk in picks:
            if pk.problem:
                st.warning(
                    pk.problem.replace("Showing fq -1", "No channel shown").replace("Showing fk -1", "No channel shown")
                )
        st.session_state["head_channel"] = (picks[0].value, picks[1].value) if ok else (None, None)
        st.session_state["head_channel_of"] = (layer, head)
    elif st.session_state.get("head_channel_of") != (layer, head):
        st.session_state["head_channel"] = (None, None)


def page_head() -> None:
    st.header("Head")
    layer, head = ui.layer_head("head")
    _head_channel(layer, head)
    summ = ui.q("head_summary_one", layer, head)
    if len(summ):
        r = summ.iloc[0]
        ia = r.ind_attn if r.ind_attn == r.ind_attn else float("nan")
        st.markdown(
            f"**Score split** (share of summed |terms|): feature × feature {r.ff_share:.1%}, SAE error "
            f"{r.err_share:.1%}, b_dec {r.bdec_resid_share:.1%}, bias {r.bias_share:.1%}. Kept rows carry "
            f"{r.kept_abs_share:.1%} of |FA|. Mean attention on induction targets: {ia:.3f}.",
            help=" ".join(HELP[t] for t in ("ff_share", "err_share", "bdec_resid_share", "kept_abs_share", "ind_attn")),
        )
    _marginals(layer, head)
    st.subheader("Attention map")
    c1, c2, c3 = st.columns([3, 1, 1])
    sample = ui.sample_picker(c1, "head")
    toks = ui.sample_tokens(sample)
    T = len(toks)
    pat = ui.q("pattern", layer, head, sample)
    pairs = ui.q("pair_terms", layer, head, sample)
    qpos = ui.select_int(
        c2,
        "query position",
        "q",
        range(T),
        default_query(pat, T),
        f"positions of sample {sample}",
        "head_q",
        fmt=lambda i: f"{i}: {toks[i]}",
        on_change=_on_q_change,
    )
    kdef = most_attended_key(pat, qpos)
    if st.session_state.pop("_head_q_changed", False):
        st.session_state["head_k"] = kdef  # a new query opens on the key it attends to most
    kpos = ui.select_int(
        c3,
        "key position",
        "k",
        range(qpos + 1),
        kdef,
        f"keys of query {qpos} (0 to q)",
        "head_k",
        fmt=lambda i: f"{i}: {toks[i]}",
    )
    d1, d2, d3 = st.columns([2, 2, 2])
    show = ui.choose(
        d1,
        "map",
        "show",
        ["attention", "score", "feature x feature"],
        "attention",
        "head_show",
        help="attention: softmax probability; score: pre-softmax score; feature x feature: its FA part.",
    )
    scale = ui.choose(
        d2,
        "colour scale",
        "scale",
        ["log", "clipped", "linear"],
        "log",
        "head_scale",
        help="log: log10 of the value (attention only); clipped: colour range at the 1st/99th "
        "percentile without the BOS column, so the sink does not hide the rest; linear: raw.",
    )
    w = ui.select_int(
        d3, "window (positions before the query)", "w", [16, 32, 64, 128, 256, 512], 32, "window sizes", "head_w"
    )
    z = np.full((T, T), np.nan)
    col = {"attention": "prob", "score": "score", "feature x feature": "ff"}[show]
    src = pat if col in ("prob", "score") else pairs
    z[src["q"].to_numpy(int), src["k"].to_numpy(int)] = src[col].to_numpy(float)
    lo = max(0, qpos - w)
    hi = min(T, qpos + max(4, w // 4) + 1)
    marks = {
        "induction target": list(
            zip(pat.loc[pat["induction"], "q"].astype(int), pat.loc[pat["induction"], "k"].astype(int))
        ),
        "selected (q, k)": [(qpos, kpos)],
    }
    eff_scale = scale if not (scale == "log" and show != "attention") else "clipped"
    title = f"{show} of head {layer}.{head}, sample {sample}, positions {lo} to {hi - 1} ({eff_scale} colour)"
    # a fresh chart per selected cell, so that no old selection swallows the next click
    ckey = f"head_map_{ui.epoch()}_{layer}_{head}_{sample}_{qpos}_{kpos}"
    st.plotly_chart(
        ui.attention_map(z, toks, lo, hi, title, eff_scale, show != "attention", marks),
        width="stretch",
        key=ckey,
        on_select=lambda: _on_cell_click(ckey),
        selection_mode="points",
    )
    st.caption("Click a cell to select its (q, k).")
    at_q = pat[pat["q"] == qpos]
    if lo > 0 and show == "attention":
        st.caption(
            f"The window hides the BOS column; query {qpos} gives BOS attention "
            f"{float(at_q.loc[at_q['k'] == 0, 'prob'].sum()):.3f}. Widen the window to see it."
        )
    _explain(layer, head, sample, qpos, kpos, toks, pairs)
    st.subheader(f"Top channels of head {layer}.{head}")
    by, no_self = ranking_controls("head")
    st.caption(
        f"By {RANKINGS[by]}, count >= {MIN_COUNT}, BOS/punctuation features dropped"
        f"{', self pairs dropped' if no_self else ''}."
    )
    top = ui.q("ranked_channels", layer, head, by, MIN_COUNT, True, no_self, 20, 20)
    top["open"] = [ui.channel_link(layer, head, r.feat_q, r.feat_k) for r in top.itertuples()]
    top = ui.with_labels(top, layer)
    ui.show_table(
        top,
        [
            "feat_q",
            "label_q",
            "feat_k",
            "label_k",
            "count",
            "sum",
            "share_of_head",
            "mean",
            "std",
            "ind_diff",
            "self_pair",
            "open",
        ],
        f"top_channels_{layer}_{head}",
        layer=layer,
    )
    ui.glossary("Head")


# ------------------------------------------------------------------------------ Channel


def _not_stored(layer: int, head: int, fq: int, fk: int, dq: int, dk: int) -> None:
    """Why a channel has no page, exactly: below min_count (with its count when the index can count it)."""
    mc = min_count()
    head_top = f"The head's top channel is {dq} → {dk}."
    if ui.has("activations"):
        n = int(ui.q("cooccurrence", layer, fq, fk)["n"].iloc[0])
        if n == 0:
            why = "the two features are never active together at a causal (q, k) of the indexed samples"
        elif mc is not None and n < mc:
            why = (
                f"its features are active together at {n} causal (q, k) pairs of the indexed samples, fewer than "
                f"the index's min_count of {mc}, so its statistics were not stored"
            )
        else:
            why = f"its features are active together at {n} causal (q, k) pairs, yet this index lacks it (partial?)"
    else:
        why = (
            f"it was seen fewer than the index's min_count ({mc}) times, or never (this index has no `activations` "
            "table to count it)"
        )
    st.warning(f"Channel ({fq} → {fk}) of head {layer}.{head} is not stored: {why}. {head_top}")
    ui.nav(st, f"Open the top channel {dq} → {dk}", ui.channel_link(layer, head, dq, dk))


def page_channel() -> None:
    st.header("Channel")
    layer, head = ui.layer_head("chan")
    n = len(ui.features(layer))
    top = ui.q("top_channels", layer, head, MIN_COUNT, True, 1)
    if top.empty:
        top = ui.q("top_channels", layer, head, 1, False, 1)
    dq, dk = (int(top["feat_q"].iloc[0]), int(top["feat_k"].iloc[0])) if len(top) else (0, 0)
    c1, c2 = st.columns(2)
    fallback = f"showing the top channel of head {layer}.{head}"
    if st.session_state.get("_adopt") or ("chan_fq" not in st.session_state and "chan_fk" not in st.session_state):
        # one bad feature id replaces both: half of the top channel is not a channel anyone asked for
        picks = [
            pick_int(ui.url_param(p), p, range(n), d, f"features of layer {layer}", fallback)
            for p, d in (("fq", dq), ("fk", dk))
        ]
        for pk in picks:
            if pk.problem:
                st.warning(pk.problem)
        bad = any(pk.problem for pk in picks)
        st.session_state["chan_fq"], st.session_state["chan_fk"] = (dq, dk) if bad else (picks[0].value, picks[1].value)
        st.session_state.setdefault("_from_url", set()).update({"chan_fq", "chan_fk"})
    fq = ui.number_int(
        c1, "feat_q (query-side feature)", "fq", n, dq, f"features of layer {layer}", "chan_fq", fallback
    )
    fk = ui.number_int(c2, "feat_k (key-side feature)", "fk", n, dk, f"features of layer {layer}", "chan_fk", fallback)
    st.markdown(f"Query feature {_feature_ref(layer, fq)} → key feature {_feature_ref(layer, fk)}")
    n1, n2, _ = st.columns([1, 1, 3])
    ui.nav(n1, f"query feature {fq} ▸", ui.feature_link(layer, fq))
    ui.nav(n2, f"key feature {fk} ▸", ui.feature_link(layer, fk))
    stats = ui.q("channel_one", layer, head, fq, fk)
    if stats.empty:
        _not_stored(layer, head, fq, fk, dq, dk)
        ui.glossary("Channel")
        return
    s = stats.iloc[0]
    c = st.columns(6)
    for col, name in zip(c, ("count", "mean", "std", "ind_mean", "other_mean", "ind_diff")):
        v = s[name]
        col.metric(
            name, "n/a" if v is None or v != v else (f"{int(v)}" if name == "count" else f"{v:.3g}"), help=HELP[name]
        )
    st.caption(
        f"{int(s['ind_count'])} of the {int(s['count'])} pairs are induction targets; the channel carries "
        f"{s['share_of_head']:.3%} of the head's summed feature x feature part (summed FA {s['sum']:.4g})."
    )
    st.subheader("Strongest examples")
    ex = ui.q("channel_examples", layer, head, fq, fk, 20)
    if ex.empty:
        st.info(
            "The index holds no stored examples of this channel: its statistics above are exact over the whole "
            "corpus, but its examples (the strongest entry of each of its strongest samples) are missing from this "
            "copy of the index."
        )
    else:
        # contexts from the sample's readable tokens (byte tokens aligned with the text), not the raw ones
        for side in ("k", "q"):
            toks = [ui.sample_tokens(int(s_)) for s_ in ex["sample"]]
            ex[f"token_{side}"] = [t[int(i)] if int(i) < len(t) else "" for t, i in zip(toks, ex[side])]
            ex[f"context_{side}"] = ["".join(t[max(int(i) - 3, 0) : int(i) + 1]) for t, i in zip(toks, ex[side])]
        ex["open"] = [ui.attention_link(layer, head, r.sample, r.q, r.k, fq, fk) for r in ex.itertuples()]
        st.caption(
            "Click a row to see the head's attention map of that sample with the query and key marked, this "
            "channel's FA there and its rank, and the feature pairs that explain that score."
        )
        ui.show_table(
            ex,
            ["value", "sample", "q", "k", "token_k", "token_q", "context_k", "context_q", "induction", "open"],
            f"examples_{layer}_{head}_{fq}_{fk}",
        )
    off = ui.q("channel_offsets", layer, head, fq, fk)
    if len(off) == 1:
        st.caption(f"All {int(off['n'].iloc[0])} stored examples sit at offset q - k = {int(off['offset'].iloc[0])}.")
    elif len(off):
        fig = go.Figure(
            go.Bar(
                x=off["offset"],
                y=off["mean"],
                customdata=off["n"],
                hovertemplate="q - k = %{x}<br>mean %{y:.4g}<br>n = %{customdata}<extra></extra>",
            )
        )
        fig.update_layout(
            title="The stored examples by offset q - k (value)",
            height=300,
            xaxis=dict(title="q - k", type="category"),
            yaxis_title="mean value",
            margin=dict(l=10, r=10, t=40, b=10),
        )
        st.plotly_chart(fig, width="stretch")
    else:
        st.caption("No stored examples of this channel, so no offset chart.")
    ui.glossary("Channel")


# ------------------------------------------------------------------------------ Sample


def page_sample() -> None:
    st.header("Sample")
    layer, head = ui.layer_head("samp")
    c1, c2 = st.columns([3, 1])
    sample = ui.sample_picker(c1, "samp")
    toks = ui.sample_tokens(sample)
    T = len(toks)
    pat = ui.q("pattern", layer, head, sample)
    qpos = ui.select_int(
        c2,
        "query position",
        "q",
        range(T),
        default_query(pat, T),
        f"positions of sample {sample}",
        "samp_q",
        fmt=lambda i: f"{i}: {toks[i]}",
    )
    at_q = pat[pat["q"] == qpos].sort_values("k")
    targets = set(at_q.loc[at_q["induction"], "k"].astype(int))
    prob = dict(zip(at_q["k"].astype(int), at_q["prob"].astype(float)))
    body = max([v for k, v in prob.items() if k > 0] or [1.0]) or 1.0
    st.markdown(
        f"**Attention of query {qpos} «{md_text(toks[qpos])}» over the text** (head {layer}.{head}; each key on a "
        f"blue background as strong as its attention, scaled to the strongest key after BOS ({body:.3f}); the "
        "query outlined in red; hover a token for its attention)"
    )
    st.markdown(
        html_tokens(
            toks[: qpos + 1],
            {k: v / body for k, v in prob.items() if k > 0},
            titles={k: f"key {k}: attention {prob.get(k, 0.0):.4f}" for k in range(qpos + 1)},
            outline={qpos: "query"},
            tail="".join(toks[qpos + 1 :]),
        ),
        unsafe_allow_html=True,
    )
    st.caption(
        f"BOS takes {prob.get(0, 0.0):.3f} of this query's attention. Text after the query is grey (the query "
        "cannot see it). ⏎ is a newline; x[1/3] is the first of three tokens that spell the character x."
    )
    with st.expander("The text with the query and its induction targets in bold"):
        st.markdown(
            md_tokens(toks, {qpos: "query", **{k: "induction target" for k in targets}}), unsafe_allow_html=True
        )
    yscale = ui.choose(
        st,
        "attention axis",
        "yscale",
        ["log", "linear"],
        "log",
        "samp_yscale",
        help="log: so that the BOS sink does not hide the other keys.",
    )
    colors = ["#999999" if k == 0 else "#ff7f0e" if k in targets else "#1f77b4" for k in at_q["k"]]
    fig = go.Figure(
        go.Bar(
            x=at_q["k"],
            y=at_q["prob"],
            marker_color=colors,
            customdata=[toks[int(k)] for k in at_q["k"]],
            hovertemplate="key %{x}: %{customdata}<br>attention %{y:.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"Attention of query {qpos} '{toks[qpos]}' over its keys (head {layer}.{head}); "
        "grey: BOS, orange: induction target",
        height=340,
        margin=dict(l=10, r=10, t=40, b=10),
        xaxis=dict(
            title="key",
            tickvals=list(at_q["k"])[:: max(1, T // 40)],
            ticktext=[f"{k}:{toks[int(k)]}" for k in at_q["k"]][:: max(1, T // 40)],
            tickangle=-60,
        ),
        yaxis=dict(title="attention", type=yscale),
    )
    st.plotly_chart(fig, width="stretch")
    top = at_q.sort_values("prob", ascending=False).head(10).copy()
    top["token_k"] = [toks[int(k)] for k in top["k"]]
    top["open"] = [ui.attention_link(layer, head, sample, qpos, k) for k in top["k"]]
    st.markdown("**Most-attended keys** (click a row for the attention map and the feature pairs behind that score)")
    ui.show_table(top, ["k", "token_k", "prob", "score", "induction", "open"], f"keys_{layer}_{head}_{sample}_{qpos}")
    ui.glossary("Sample")

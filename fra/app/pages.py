"""The explorer's pages. Each reads the index only through named queries (`ui.q`) and keeps its
state in the URL (`ui.select_int` and friends)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from fra.app import ui
from fra.app.glossary import HELP
from fra.app.state import pick_int
from fra.app.text import md_context, md_text, md_tokens

MIN_COUNT = 8  # channels seen fewer times are too noisy to rank


def _feature_ref(layer: int, f: int) -> str:
    """`[123](link) "label"` as Markdown."""
    lab = ui.label_of(layer, f)
    return f"[{f}]({ui.feature_link(layer, f)})" + (f" {md_text(lab)}" if lab else "")


# ------------------------------------------------------------------------------ Home


def page_home(meta: dict) -> None:
    st.header("Home: the strongest channels of this index")
    st.markdown(
        "FRA splits every attention score exactly into SAE feature-pair terms (**FA**). A **channel** is one "
        "(query feature, key feature) pair of one head. Start from a channel below, search a feature by id, "
        f"label or token text on [Feature search]({ui.link('Feature search')}), or open a head's attention map "
        f"on [Head]({ui.link('Head')})."
    )
    heads = meta.get("heads")
    st.markdown(
        f"**Index**: model `{meta.get('model')}`, layers {', '.join(str(l) for l in meta.get('layers', []))}, "
        f"{heads if isinstance(heads, int) else len(heads or [])} heads per layer, {meta.get('n_samples')} samples."
    )
    st.subheader("Strongest channels across heads")
    st.caption(
        f"By |mean-when-active| over channels seen at least {MIN_COUNT} times, BOS and punctuation "
        "features dropped; at most 5 per head."
    )
    top = ui.q("explorer_strongest_channels", MIN_COUNT, True, 5, 30)
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
                "mean",
                "ind_diff",
                "share_of_head",
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


def page_feature() -> None:
    st.header("Feature search")
    lh = ui.layers_heads()
    c1, c2 = st.columns([2, 1])
    layer = ui.select_int(c2, "layer", "layer", sorted(lh), sorted(lh)[0], "layers of this index", "feature_layer")
    if "feature_id" not in st.session_state:
        st.session_state["feature_id"] = str(st.query_params.get("feature", ""))
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
    contexts = row.get("top_contexts") if "top_contexts" in row else None
    if _is_list(contexts) and len(contexts):
        st.markdown("**Top-activating contexts** (held-out text; the activating token in bold)")
        st.markdown("\n".join("- " + md_context(c) for c in list(contexts)[:10]), unsafe_allow_html=True)
    chans = ui.q("feature_channels", feature, layer, 1, 20000)
    if chans.empty:
        st.info(
            "This feature appears in no stored channel of this index (it may be rare in the indexed corpus, "
            "or its channels were seen fewer times than the index's min_count)."
        )
        ui.glossary("Feature search")
        return
    chans["partner"] = np.where(chans["side"] == "key", chans["feat_q"], chans["feat_k"])
    chans["open"] = [ui.channel_link(r.layer, r.head, r.feat_q, r.feat_k) for r in chans.itertuples()]
    chans = ui.with_labels(chans, "layer", cols=("partner",))
    chans["abs_mean"] = chans["mean"].abs()
    strong = chans[chans["count"] >= min(MIN_COUNT, chans["count"].max())]
    # a self pair ('both') competes on both sides
    sided = pd.concat(
        [strong[strong["side"] != "key"].assign(side="query"), strong[strong["side"] != "query"].assign(side="key")]
    )
    best = (
        sided.sort_values("abs_mean", ascending=False)
        .groupby(["head", "side"], as_index=False)
        .head(1)
        .sort_values(["side", "head"])
    )
    st.markdown(
        "**Strongest channel per head** (largest |mean|, seen at least "
        f"{min(MIN_COUNT, int(chans['count'].max()))} times), with this feature on the query side and on the key side"
    )
    ui.show_table(
        best,
        ["side", "head", "feat_q", "feat_k", "partner_label", "count", "mean", "ind_diff", "open"],
        f"feature_{layer}_{feature}_per_head",
        layer="layer",
    )
    with st.expander(f"All {len(chans)} channels of this feature (by |mean|, the first 500 shown)"):
        ui.show_table(
            chans.sort_values("abs_mean", ascending=False).head(500),
            ["side", "head", "feat_q", "feat_k", "partner_label", "count", "mean", "ind_diff", "share_of_head", "open"],
            f"feature_{layer}_{feature}_channels",
            layer="layer",
        )
    ui.glossary("Feature search")


# ------------------------------------------------------------------------------ Head (attention map)


def default_query(pat: pd.DataFrame, T: int) -> int:
    """The query that attends most to an induction target (the clearest case to look at), else the last."""
    ind = pat[pat["induction"]]
    return int(ind.sort_values("prob", ascending=False)["q"].iloc[0]) if len(ind) else T - 1


def _explain(layer: int, head: int, sample: int, qpos: int, kpos: int, toks: list[str], pairs: pd.DataFrame) -> None:
    """Which feature pairs explain score(q, k), and what share of the score they cover."""
    st.subheader(f"Why query {qpos} «{md_text(toks[qpos])}» attends to key {kpos} «{md_text(toks[kpos])}»")
    p = pairs[(pairs["q"] == qpos) & (pairs["k"] == kpos)]
    if p.empty:
        st.info(f"The index holds no score for (q={qpos}, k={kpos}) of sample {sample} (k must be at most q).")
        return
    p = p.iloc[0]
    rows = ui.q("query_rows", layer, head, sample, qpos)
    rows = rows[rows["k"] == kpos].copy()
    kept = float(rows["value"].sum()) if len(rows) else 0.0
    score, ff = float(p["score"]), float(p["ff"])
    c = st.columns(4)
    c[0].metric("score", f"{score:.3f}", help=HELP["score"])
    c[1].metric("feature × feature part", f"{ff:.3f}", help=HELP["ff"])
    c[2].metric("shown pairs' sum", f"{kept:.3f}", help=HELP["kept"])
    c[3].metric(
        "share of the score they cover",
        f"{kept / score:.1%}" if score else "n/a",
        help="Sum of the listed pairs' FA divided by the score (and below, by the feature x feature part).",
    )
    terms = pd.DataFrame({"term": ["ff", "f_bdec", "f_err", "bdec_f", "err_f", "resid_resid", "bias"]})
    terms["value"] = [float(p[t]) for t in terms["term"]]
    terms["share_of_score"] = terms["value"] / score if score else np.nan
    terms["meaning"] = [HELP[t] for t in terms["term"]]
    if rows.empty:
        st.info(
            f"No feature pair at this (q, k) is among the index's kept rows: the index stores, per head and "
            f"query, only the pairs with the largest |FA|. The feature x feature part ({ff:.3f}) is spread over "
            "smaller terms; the split of the score into its parts is below."
        )
    else:
        st.caption(
            f"{len(rows)} kept feature pairs sum to {kept:.3f}: {kept / score:.1%} of the score and "
            f"{(kept / ff if ff else float('nan')):.1%} of its feature × feature part."
        )
        rows["share_of_score"] = rows["value"] / score if score else np.nan
        rows["open"] = [ui.channel_link(layer, head, r.feat_q, r.feat_k) for r in rows.itertuples()]
        rows = ui.with_labels(rows, layer)
        ui.show_table(
            rows,
            ["feat_q", "label_q", "feat_k", "label_k", "value", "share_of_score", "open"],
            f"pairs_{layer}_{head}_{sample}_{qpos}_{kpos}",
            layer=layer,
        )
    st.markdown("**The score split into its parts** (exact; they sum to the score)")
    ui.show_table(terms, ["term", "value", "share_of_score", "meaning"], f"terms_{layer}_{head}_{sample}_{qpos}_{kpos}")


def page_head() -> None:
    st.header("Head")
    layer, head = ui.layer_head("head")
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
    )
    at_q = pat[pat["q"] == qpos].sort_values("prob", ascending=False)
    non_bos = at_q[at_q["k"] > 0]
    kdef = int(non_bos["k"].iloc[0]) if len(non_bos) else 0
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
    st.plotly_chart(ui.attention_map(z, toks, lo, hi, title, eff_scale, show != "attention", marks), width="stretch")
    if lo > 0 and show == "attention":
        st.caption(
            f"The window hides the BOS column; query {qpos} gives BOS attention "
            f"{float(at_q.loc[at_q['k'] == 0, 'prob'].sum()):.3f}. Widen the window to see it."
        )
    _explain(layer, head, sample, qpos, kpos, toks, pairs)
    st.subheader(f"Top channels of head {layer}.{head}")
    st.caption(f"By |mean-when-active|, count >= {MIN_COUNT}, BOS/punctuation features dropped.")
    top = ui.q("top_channels", layer, head, MIN_COUNT, True, 20)
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
            "mean",
            "std",
            "ind_diff",
            "share_of_head",
            "self_pair",
            "open",
        ],
        f"top_channels_{layer}_{head}",
        layer=layer,
    )
    ui.glossary("Head")


# ------------------------------------------------------------------------------ Channel


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
    if "chan_fq" not in st.session_state and "chan_fk" not in st.session_state:
        # one bad feature id replaces both: half of the top channel is not a channel anyone asked for
        picks = [
            pick_int(st.query_params.get(p), p, range(n), d, f"features of layer {layer}", fallback)
            for p, d in (("fq", dq), ("fk", dk))
        ]
        for pk in picks:
            if pk.problem:
                st.warning(pk.problem)
        bad = any(pk.problem for pk in picks)
        st.session_state["chan_fq"], st.session_state["chan_fk"] = (dq, dk) if bad else (picks[0].value, picks[1].value)
    fq = ui.number_int(
        c1, "feat_q (query-side feature)", "fq", n, dq, f"features of layer {layer}", "chan_fq", fallback
    )
    fk = ui.number_int(c2, "feat_k (key-side feature)", "fk", n, dk, f"features of layer {layer}", "chan_fk", fallback)
    st.markdown(f"Query feature {_feature_ref(layer, fq)} → key feature {_feature_ref(layer, fk)}")
    stats = ui.q("channel_one", layer, head, fq, fk)
    if stats.empty:
        st.warning(
            f"Channel ({fq} → {fk}) of head {layer}.{head} is not in the index: the two features are never "
            f"active together at a causal (q, k), or were seen fewer times than the index's min_count. "
            f"The head's top channel is [{dq} → {dk}]({ui.channel_link(layer, head, dq, dk)})."
        )
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
        f"{s['share_of_head']:.3%} of the head's summed feature x feature part."
    )
    st.subheader("Strongest examples")
    try:
        ex = ui.q("channel_examples", layer, head, fq, fk, 20)
    except ui.QueryFailed as exc:
        st.warning(f"This index cannot list examples of a channel ({exc}). Rebuild it with the current `fra ingest`.")
        ex = pd.DataFrame()
    if ex.empty:
        st.info(
            "The index holds no stored examples of this channel: its statistics above are exact over the whole "
            "corpus, but individual (q, k) entries are kept only where they are among the largest terms of a "
            "query. Indexes built with per-channel examples list them here."
        )
    else:
        # contexts from the sample's readable tokens (byte tokens aligned with the text), not the raw ones
        for side in ("k", "q"):
            toks = [ui.sample_tokens(int(s_)) for s_ in ex["sample"]]
            ex[f"token_{side}"] = [t[int(i)] if int(i) < len(t) else "" for t, i in zip(toks, ex[side])]
            ex[f"context_{side}"] = ["".join(t[max(int(i) - 3, 0) : int(i) + 1]) for t, i in zip(toks, ex[side])]
        ex["open"] = [ui.attention_link(layer, head, r.sample, r.q, r.k) for r in ex.itertuples()]
        st.caption(
            "Each 'open' shows the head's attention map of that sample with the query and key marked, and "
            "the feature pairs that explain that score."
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
            xaxis_title="q - k",
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
    st.markdown(md_tokens(toks, {qpos: "query", **{k: "induction target" for k in targets}}), unsafe_allow_html=True)
    st.caption(
        "Bold: the query and its induction targets (subscript: position). ⏎ is a newline; x[1/3] is the "
        "first of three tokens that spell the character x."
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
    st.markdown("**Most-attended keys** ('open' shows the attention map and the feature pairs behind that score)")
    ui.show_table(top, ["k", "token_k", "prob", "score", "induction", "open"], f"keys_{layer}_{head}_{sample}_{qpos}")
    ui.glossary("Sample")

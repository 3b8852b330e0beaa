"""FRA explorer (Streamlit). Reads an index through fra.queries only; never imports torch.

Run with `fra app --index runs/demo` (or FRA_INDEX=... streamlit run app/main.py).
Pages: Feature search, Head, Channel, Sample, CIH. Every page keeps its state in the URL query
parameters, so a channel is a link: ?page=Channel&layer=17&head=6&fq=12&fk=40.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import plotly.graph_objects as go
import streamlit as st

from fra.queries import IndexNotFound, connect, manifest
from fra.queries.lib import run

PAGES = ("Feature search", "Head", "Channel", "Sample", "CIH")


def index_path() -> Path:
    p = argparse.ArgumentParser()
    p.add_argument("--index", default=os.environ.get("FRA_INDEX", "runs/demo"))
    args, _ = p.parse_known_args(sys.argv[1:])
    return Path(args.index)


@st.cache_resource
def connection(path: str):
    """One read-only DuckDB connection, shared; every query takes its own cursor."""
    return connect(path)


def q(name: str, *params):
    return run(connection(str(INDEX)), name, list(params))


def qp_int(key: str, default: int | None) -> int | None:
    try:
        return int(st.query_params.get(key, default))
    except (TypeError, ValueError):
        return default


def link(**params) -> str:
    return "?" + "&".join(f"{k}={v}" for k, v in params.items())


def table(df, columns):
    """A dataframe whose 'open' column (if any) is a link to another page."""
    cfg = {"open": st.column_config.LinkColumn("open", display_text="open")} if "open" in columns else None
    st.dataframe(df[columns], hide_index=True, column_config=cfg, use_container_width=True)


def heatmap(z, x, y, title, colorscale="RdBu", zmid=0.0):
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorscale=colorscale, zmid=zmid))
    fig.update_layout(title=title, height=420, margin=dict(l=10, r=10, t=40, b=10),
                      yaxis=dict(autorange="reversed", title="query"), xaxis=dict(title="key"))
    return fig


def layer_head_picker(key: str):
    lh = q("layers_heads")
    layers = sorted(lh["layer"].unique().tolist())
    c1, c2 = st.columns(2)
    default_layer = qp_int("layer", layers[0])
    layer = c1.selectbox("layer", layers, index=layers.index(default_layer) if default_layer in layers else 0, key=f"{key}_layer")
    heads = sorted(lh[lh["layer"] == layer]["head"].tolist())
    default_head = qp_int("head", heads[0])
    head = c2.selectbox("head", heads, index=heads.index(default_head) if default_head in heads else 0, key=f"{key}_head")
    return int(layer), int(head)


def sample_picker(key: str) -> int:
    samples = q("sample_ids")
    ids = samples["sample"].tolist()
    default = qp_int("sample", ids[0])
    labels = {r.sample: f"{r.sample}: {r.text}" for r in samples.itertuples()}
    return int(st.selectbox("sample", ids, index=ids.index(default) if default in ids else 0,
                            format_func=lambda s: labels[s], key=f"{key}_sample"))


def tokens_of(sample: int) -> list[str]:
    df = q("sample", sample)
    return [t.replace("\n", "⏎") for t in df["tokens"].iloc[0]] if len(df) else []


# ------------------------------------------------------------------------------------------


def page_feature():
    st.header("Feature search")
    layers = sorted(q("layers_heads")["layer"].unique().tolist())
    c1, c2 = st.columns(2)
    raw = c1.text_input("feature ID", value=str(st.query_params.get("feature", "")), key="feature_id")
    default_layer = qp_int("layer", layers[0])
    layer = c2.selectbox("layer", layers, index=layers.index(default_layer) if default_layer in layers else 0,
                         key="feature_layer")
    if not raw.strip():
        st.info("Type a feature ID (an integer) to see its label, contexts and channels.")
        return
    try:
        feature = int(raw.strip())
    except ValueError:
        st.warning(f"{raw!r} is not a feature ID: type a whole number, such as 123.")
        return
    info = q("feature_info", feature, layer, layer)
    if info.empty:
        n = q("n_features", layer)["n"].iloc[0]
        st.warning(f"Feature {feature} does not exist in layer {layer}: this SAE has features 0 to {n - 1}.")
        return
    row = info.iloc[0]
    st.subheader(f"Feature {feature} (layer {layer}): {row.get('label') or 'no label'}")
    st.caption(f"fires on {row['index_frequency']:.3%} of indexed tokens; on BOS in {row['bos_rate']:.0%} of samples")
    contexts = row.get("top_contexts")
    if isinstance(contexts, (list, tuple)) or hasattr(contexts, "tolist"):
        st.markdown("**Top-activating contexts** (held-out text; the activating token in **bold**)")
        for c in list(contexts)[:8]:
            st.markdown("- " + c.replace("[[", "**").replace("]]", "**"))
    chans = q("feature_channels", feature, layer, 1, 200)
    if chans.empty:
        st.info("This feature appears in no stored channel (it may be rare in the indexed corpus).")
        return
    for side, title in (("query", "as the query-side feature"), ("key", "as the key-side feature")):
        sub = chans[chans["side"].isin([side, "both"])].head(15).copy()
        st.markdown(f"**Strongest channels {title}**")
        sub["open"] = [link(page="Channel", layer=r.layer, head=r.head, fq=r.feat_q, fk=r.feat_k)
                       for r in sub.itertuples()]
        table(sub, ["layer", "head", "feat_q", "feat_k", "count", "mean", "ind_diff", "open"])


def page_head():
    st.header("Head")
    layer, head = layer_head_picker("head")
    sample = sample_picker("head")
    toks = tokens_of(sample)
    pat = q("pattern", layer, head, sample)
    T = len(toks)
    import numpy as np

    prob = np.full((T, T), np.nan)
    prob[pat["q"], pat["k"]] = pat["prob"]
    pairs = q("pair_terms", layer, head, sample)
    ff = np.full((T, T), np.nan)
    ff[pairs["q"], pairs["k"]] = pairs["ff"]
    labels = [f"{i}:{t}" for i, t in enumerate(toks)]
    c1, c2 = st.columns(2)
    c1.plotly_chart(heatmap(prob, labels, labels, "attention pattern", "Blues", None), use_container_width=True)
    c2.plotly_chart(heatmap(ff, labels, labels, "feature x feature part of the score"), use_container_width=True)
    summ = q("head_summary_one", layer, head)
    if len(summ):
        r = summ.iloc[0]
        st.markdown(f"**Score split (share of summed |terms|):** feature x feature {r.ff_share:.1%}, "
                    f"SAE error {r.err_share:.1%}, b_dec {r.bdec_resid_share:.1%}, bias {r.bias_share:.1%}. "
                    f"Kept rows carry {r.kept_abs_share:.1%} of |FA|. Induction attention on this corpus: "
                    f"{r.ind_attn if r.ind_attn == r.ind_attn else float('nan'):.3f}")
    st.markdown("**Top channels** (by |mean-when-active|, count >= 8, BOS/punctuation features dropped)")
    top = q("top_channels", layer, head, 8, True, 20)
    top["open"] = [link(page="Channel", layer=layer, head=head, fq=r.feat_q, fk=r.feat_k) for r in top.itertuples()]
    table(top, ["feat_q", "feat_k", "count", "mean", "std", "ind_diff", "share_of_head", "self_pair", "open"])


def page_channel():
    st.header("Channel")
    layer, head = layer_head_picker("chan")
    c1, c2 = st.columns(2)
    fq = c1.number_input("feat_q", min_value=0, value=qp_int("fq", 0) or 0, step=1, key="chan_fq")
    fk = c2.number_input("feat_k", min_value=0, value=qp_int("fk", 0) or 0, step=1, key="chan_fk")
    stats = q("channel_one", layer, head, int(fq), int(fk))
    if stats.empty:
        st.warning(f"Channel ({fq} -> {fk}) of head {layer}.{head} is not in the index (never co-active, "
                   "or seen fewer times than the index's min_count).")
        return
    s = stats.iloc[0]
    st.markdown(f"**count** {s['count']}, **mean-when-active** {s['mean']:.4g} (std {s['std']:.3g}), "
                f"**on induction targets** {s['ind_mean'] if s['ind_count'] else float('nan'):.4g} over {s['ind_count']} pairs "
                f"vs {s['other_mean'] if s['other_mean'] == s['other_mean'] else float('nan'):.4g} elsewhere")
    ex = q("channel_examples", layer, head, int(fq), int(fk), 20)
    st.markdown("**Top examples across the corpus** (key token and query token in bold)")
    def bold_last(context: str, token: str) -> str:
        head = context[: len(context) - len(token)] if context.endswith(token) else context
        return f"{head} **{token.strip()}**".replace("\n", " ")

    for r in ex.itertuples():
        st.markdown(f"- {r.value:+.3f}  sample {r.sample}: …{bold_last(r.context_k, r.token_k)} … "
                    f"{bold_last(r.context_q, r.token_q)}" + ("  (induction target)" if r.induction else ""))
    sample = sample_picker("chan")
    toks = tokens_of(sample)
    import numpy as np

    hm = q("channel_heatmap", layer, head, sample, int(fq), int(fk))
    z = np.full((len(toks), len(toks)), np.nan)
    z[hm["q"], hm["k"]] = hm["value"]
    labels = [f"{i}:{t}" for i, t in enumerate(toks)]
    st.plotly_chart(heatmap(z, labels, labels, f"FA[:, :, {fq}, {fk}] (kept rows only)"), use_container_width=True)
    off = q("channel_offsets", layer, head, int(fq), int(fk))
    if len(off):
        fig = go.Figure(go.Bar(x=off["offset"], y=off["mean"], name="mean value"))
        fig.update_layout(title="kept entries by offset q - k", height=300, xaxis_title="q - k", yaxis_title="mean value")
        st.plotly_chart(fig, use_container_width=True)


def page_sample():
    st.header("Sample")
    layer, head = layer_head_picker("samp")
    sample = sample_picker("samp")
    toks = tokens_of(sample)
    st.markdown(" ".join(f"`{i}:{t}`" for i, t in enumerate(toks)))
    qpos = st.selectbox("query token", list(range(len(toks))), index=len(toks) - 1,
                        format_func=lambda i: f"{i}: {toks[i]}", key="samp_q")
    pat = q("pattern", layer, head, sample)
    pat = pat[pat["q"] == qpos].sort_values("prob", ascending=False).head(5)
    rows = q("query_rows", layer, head, sample, int(qpos))
    for r in pat.itertuples():
        st.markdown(f"**key {r.k}: `{toks[r.k]}`** attention {r.prob:.3f}, score {r.score:.2f}"
                    + (" (induction target)" if r.induction else ""))
        sub = rows[rows["k"] == r.k].head(5)
        if len(sub):
            table(sub, ["feat_q", "feat_k", "value"])
        else:
            st.caption("no kept feature pairs at this key")


def page_cih():
    st.header("Conceptual induction heads")
    path = Path(os.environ.get("FRA_CIH_REPORT", "reports/cih/cih.json"))
    if not path.exists():
        st.info(f"No CIH report at {path}. Run `fra report cih` first.")
        return
    rep = json.loads(path.read_text())
    st.json(rep["answers"]["summary"])
    st.markdown("Token induction heads (census): " + ", ".join(rep["tih"]))
    import pandas as pd

    rows = [dict(head=f"{l}.{t['head']}", **{k: t[k] for k in ("family", "feat_q", "feat_k", "margin_B", "shifted_B",
                                                             "control_B", "q", "cih")}, layer=int(l))
            for l, lr in rep["layers"].items() for t in lr["tests"]]
    df = pd.DataFrame(rows)
    fam = st.selectbox("prompt family", sorted(df["family"].unique()), key="cih_family")
    df = df[df["family"] == fam].sort_values(["cih", "q"], ascending=[False, True])
    df["open"] = [link(page="Channel", layer=r.layer, head=r.head.split(".")[1], fq=r.feat_q, fk=r.feat_k)
                  for r in df.itertuples()]
    table(df.head(60), ["head", "family", "feat_q", "feat_k", "margin_B", "shifted_B", "control_B", "q", "cih", "open"])


# ------------------------------------------------------------------------------------------

st.set_page_config(page_title="FRA explorer", layout="wide")
INDEX = index_path()
try:
    meta = manifest(INDEX)
    connection(str(INDEX))
except (IndexNotFound, FileNotFoundError) as exc:
    st.error(f"Cannot open the index: {exc}")
    st.stop()
st.sidebar.title("FRA explorer")
st.sidebar.caption(f"index {INDEX}: {meta['model']}, layers {meta['layers']}, {meta['n_samples']} samples")
default_page = st.query_params.get("page", PAGES[0])
page = st.sidebar.radio("page", PAGES, index=PAGES.index(default_page) if default_page in PAGES else 0, key="page")
{"Feature search": page_feature, "Head": page_head, "Channel": page_channel, "Sample": page_sample, "CIH": page_cih}[page]()

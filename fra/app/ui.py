"""Streamlit helpers of the explorer: cached queries, URL-bound widgets, tables with labels, links
and downloads, and attention maps.

URL state, both ways: a widget is initialised from `st.query_params` the first time it is drawn in
a session (the value checked by `fra.app.state`; a bad value is replaced by the default with a
warning that says what is available), and after the page is drawn the URL is rewritten from the
widgets (`sync_url`), so a reload or a shared link shows the same page.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from fra.app.glossary import HELP, PAGE_TERMS
from fra.app.state import pick_int, query_string
from fra.app.text import readable_label, readable_tokens
from fra.queries import connect
from fra.queries.lib import run


class QueryFailed(RuntimeError):
    """A named query failed on this index (shown as a message, never as a traceback)."""


# ------------------------------------------------------------------------------ queries


@st.cache_resource
def connection(path: str):
    """One read-only DuckDB connection, shared; every query takes its own cursor."""
    return connect(path)


@st.cache_data(show_spinner=False, max_entries=512)
def _cached(path: str, name: str, params: tuple) -> pd.DataFrame:
    return run(connection(path), name, list(params))


def q(name: str, *params) -> pd.DataFrame:
    """A named query of queries/named.sql over the index (results cached: the index is read-only)."""
    try:
        return _cached(str(st.session_state["_index"]), name, tuple(params)).copy()
    except Exception as exc:  # duckdb raises many classes; all of them mean "this index can't answer"
        raise QueryFailed(f"query `{name}` failed on this index: {str(exc).splitlines()[0]}") from exc


@st.cache_data(show_spinner=False, max_entries=16)
def _features(path: str, layer: int) -> pd.DataFrame:
    df = _cached(path, "explorer_features", (layer,)).copy()
    if "label" not in df:
        df["label"] = None
    ctx = df["top_contexts"] if "top_contexts" in df else [None] * len(df)
    df["label_text"] = [readable_label(l, c) for l, c in zip(df["label"], ctx)]
    return df.set_index("feature", drop=False)


def features(layer: int) -> pd.DataFrame:
    """The layer's features table indexed by feature id, with a readable `label_text` column."""
    try:
        return _features(str(st.session_state["_index"]), int(layer))
    except Exception as exc:
        raise QueryFailed(f"query `explorer_features` failed on this index: {str(exc).splitlines()[0]}") from exc


@st.cache_data(show_spinner=False, max_entries=16)
def _labels(path: str, layer: int) -> dict[int, str]:
    f = _features(path, layer)
    return dict(zip(f["feature"].astype(int), f["label_text"]))


def labels(layer: int) -> dict[int, str]:
    features(layer)  # raises QueryFailed with a message if the index can't answer
    return _labels(str(st.session_state["_index"]), int(layer))


def label_of(layer: int, feature: int) -> str:
    return labels(layer).get(int(feature), "")


def layers_heads() -> dict[int, list[int]]:
    lh = q("layers_heads")
    return {int(l): sorted(int(h) for h in g["head"]) for l, g in lh.groupby("layer")}


def samples() -> pd.DataFrame:
    return q("sample_ids")


def sample_tokens(sample: int) -> list[str]:
    df = q("sample", sample)
    if df.empty:
        return []
    return readable_tokens(list(df["tokens"].iloc[0]), df["text"].iloc[0])


# ------------------------------------------------------------------------------ URL state


def url() -> dict:
    """The state this run will write back to the address bar."""
    return st.session_state.setdefault("_url", {})


def link(page: str, **params) -> str:
    return query_string({"page": page, **params})


def feature_link(layer: int, feature: int) -> str:
    return link("Feature search", layer=int(layer), feature=int(feature))


def channel_link(layer: int, head: int, fq: int, fk: int) -> str:
    return link("Channel", layer=int(layer), head=int(head), fq=int(fq), fk=int(fk))


def attention_link(layer: int, head: int, sample: int, qpos: int, kpos: int) -> str:
    return link("Head", layer=int(layer), head=int(head), sample=int(sample), q=int(qpos), k=int(kpos))


def _init(wkey: str, param: str, options: Sequence, default, what: str, fallback: str = "") -> None:
    """Set a widget's state from the URL the first time it is drawn, else keep it valid."""
    if wkey not in st.session_state:
        choice = pick_int(st.query_params.get(param), param, options, default, what, fallback)
        if choice.problem:
            st.warning(choice.problem)
        st.session_state[wkey] = choice.value
    elif st.session_state[wkey] not in options:
        st.session_state[wkey] = default


def select_int(
    container,
    label: str,
    param: str,
    options: Sequence[int],
    default: int,
    what: str,
    key: str,
    fmt: Callable | None = None,
    fallback: str = "",
    help: str | None = None,
) -> int:
    """A selectbox whose value lives in URL parameter `param`."""
    options = list(options)
    _init(key, param, options, default, what, fallback)
    value = container.selectbox(label, options, key=key, format_func=fmt or str, help=help or HELP.get(param))
    url()[param] = int(value)
    return int(value)


def number_int(
    container,
    label: str,
    param: str,
    n: int,
    default: int,
    what: str,
    key: str,
    fallback: str = "",
    help: str | None = None,
) -> int:
    """A number input in 0..n-1 whose value lives in URL parameter `param` (checked before the widget sees it)."""
    _init(key, param, range(n), default, what, fallback)
    value = container.number_input(
        label, min_value=0, max_value=max(n - 1, 0), step=1, key=key, help=help or HELP.get(param)
    )
    url()[param] = int(value)
    return int(value)


def choose(
    container,
    label: str,
    param: str,
    options: Sequence[str],
    default: str,
    key: str,
    help: str | None = None,
    horizontal: bool = True,
) -> str:
    """A radio of strings whose value lives in URL parameter `param`."""
    options = list(options)
    if key not in st.session_state:
        raw = st.query_params.get(param)
        if raw is not None and raw not in options:
            st.warning(f"{param}={raw!r} is not one of {', '.join(options)}. Showing {default}.")
        st.session_state[key] = raw if raw in options else default
    value = container.radio(label, options, key=key, horizontal=horizontal, help=help)
    url()[param] = value
    return value


def sync_url(page: str) -> None:
    """Write this run's state into the address bar (replacing what was there)."""
    st.query_params.from_dict({"page": page, **{k: str(v) for k, v in url().items()}})


def layer_head(page_key: str, default_layer: int | None = None) -> tuple[int, int]:
    lh = layers_heads()
    layers = sorted(lh)
    c1, c2 = st.columns(2)
    layer = select_int(
        c1,
        "layer",
        "layer",
        layers,
        default_layer if default_layer in lh else layers[0],
        "layers of this index",
        f"{page_key}_layer",
    )
    head = select_int(c2, "head", "head", lh[layer], lh[layer][0], f"heads of layer {layer}", f"{page_key}_head")
    return layer, head


def sample_picker(container, page_key: str) -> int:
    s = samples()
    ids = [int(i) for i in s["sample"]]
    text = dict(zip(s["sample"], s["text"]))
    return select_int(
        container,
        "sample",
        "sample",
        ids,
        ids[0],
        "samples of this index",
        f"{page_key}_sample",
        fmt=lambda i: f"{i}: {str(text.get(i, ''))[:70]}",
    )


# ------------------------------------------------------------------------------ tables


def with_labels(df: pd.DataFrame, layer_col_or_value, cols=("feat_q", "feat_k")) -> pd.DataFrame:
    """Adds `label_q` / `label_k` (or `<col>_label`) next to feature-id columns."""
    df = df.copy()
    layers = (
        df[layer_col_or_value] if isinstance(layer_col_or_value, str) else pd.Series(layer_col_or_value, index=df.index)
    )
    maps = {int(l): labels(int(l)) for l in layers.unique()} if len(df) else {}
    for col in cols:
        if col not in df:
            continue
        name = {"feat_q": "label_q", "feat_k": "label_k"}.get(col, f"{col}_label")
        df[name] = [maps[int(l)].get(int(f), "") for l, f in zip(layers, df[col])]
    return df


def show_table(
    df: pd.DataFrame,
    columns: Sequence[str],
    key: str,
    feature_cols=("feat_q", "feat_k", "feature", "partner"),
    layer: int | str | None = None,
    open_col: str | None = None,
    height: int | None = None,
    helps: dict[str, str] | None = None,
) -> None:
    """A table with help on every column (`helps` overrides the glossary), feature ids as links to
    their pages, an optional 'open' link column, and visible CSV / Parquet downloads of the data shown."""
    columns = [c for c in columns if c in df.columns]
    data = df[columns].reset_index(drop=True)
    view = data.copy()
    cfg = {}
    for c in columns:
        h = (helps or {}).get(c) or HELP.get(c)
        if c in feature_cols and layer is not None:
            layers = df[layer].tolist() if isinstance(layer, str) else [layer] * len(df)
            view[c] = [feature_link(l, f) for l, f in zip(layers, data[c])]
            cfg[c] = st.column_config.LinkColumn(c, help=h, display_text=r"feature=(\d+)")
        elif c == open_col or c == "open":
            cfg[c] = st.column_config.LinkColumn(c, help=h or HELP["open"], display_text="open")
        elif "share" in c and pd.api.types.is_float_dtype(data[c]):
            cfg[c] = st.column_config.NumberColumn(c, help=h, format="percent")
        elif h:
            cfg[c] = st.column_config.Column(c, help=h)
    st.dataframe(view, hide_index=True, column_config=cfg, width="stretch", height=height or "auto")
    downloads(data.drop(columns=[c for c in ("open",) if c in data]), key)


def downloads(df: pd.DataFrame, key: str) -> None:
    c1, c2, _ = st.columns([1, 1, 6])
    c1.download_button(
        "⬇ CSV",
        df.to_csv(index=False).encode(),
        file_name=f"{key}.csv",
        mime="text/csv",
        key=f"dl_{key}_csv",
        on_click="ignore",
    )
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    c2.download_button(
        "⬇ Parquet",
        buf.getvalue(),
        file_name=f"{key}.parquet",
        mime="application/octet-stream",
        key=f"dl_{key}_parquet",
        on_click="ignore",
    )


def glossary(page: str) -> None:
    with st.expander("What the words mean"):
        st.markdown("\n".join(f"- **{t}**: {HELP[t]}" for t in PAGE_TERMS.get(page, []) if t in HELP))


# ------------------------------------------------------------------------------ plots


def attention_map(
    z: np.ndarray,
    toks: list[str],
    lo: int,
    hi: int,
    title: str,
    scale: str,
    diverging: bool,
    marks: dict[str, list[tuple[int, int]]],
) -> go.Figure:
    """A heatmap of z[lo:hi, lo:hi] (queries down, keys across) with marked (q, k) cells.

    scale: 'log' (log10 of a probability, floor 1e-4), 'clipped' (colour range at the 1st / 99th
    percentile of the cells off the BOS column, so the attention sink does not wash out the rest)
    or 'linear'.
    """
    sub = z[lo:hi, lo:hi]
    zmin = zmax = None
    colorbar = None
    if scale == "log" and not diverging:
        sub = np.log10(np.clip(sub, 1e-4, None))
        colorbar = dict(title="log10")
    elif scale == "clipped":
        body = z[lo:hi, max(lo, 1) : hi]
        vals = body[np.isfinite(body)]
        if vals.size:
            a, b = np.percentile(vals, [1, 99])
            if diverging:
                b = max(abs(a), abs(b)) or 1.0
                a = -b
            zmin, zmax = float(a), float(b) if b > a else float(a) + 1e-9
    pos = list(range(lo, hi))
    text = [f"{i}:{toks[i]}" for i in pos]
    fig = go.Figure(
        go.Heatmap(
            z=sub,
            x=pos,
            y=pos,
            zmin=zmin,
            zmax=zmax,
            colorbar=colorbar,
            colorscale="RdBu" if diverging else "Blues",
            zmid=0.0 if diverging and zmin is None else None,
            reversescale=diverging,
            customdata=[[f"q {text[i]} → k {text[j]}" for j in range(len(pos))] for i in range(len(pos))],
            hovertemplate="%{customdata}<br>%{z:.4g}<extra></extra>",
        )
    )
    styles = {
        "induction target": dict(symbol="circle-open", color="orange", size=9, line=dict(width=2)),
        "selected (q, k)": dict(symbol="square-open", color="red", size=14, line=dict(width=3)),
    }
    for name, cells in marks.items():
        cells = [(a, b) for a, b in cells if lo <= a < hi and lo <= b < hi]
        if cells:
            fig.add_trace(
                go.Scatter(
                    x=[b for _, b in cells],
                    y=[a for a, _ in cells],
                    mode="markers",
                    name=name,
                    marker=styles.get(name, dict(symbol="x")),
                    hoverinfo="skip",
                )
            )
    step = max(1, len(pos) // 40)
    fig.update_layout(
        title=title,
        height=max(380, min(900, 14 * len(pos) + 140)),
        margin=dict(l=10, r=10, t=40, b=10),
        legend=dict(orientation="h", y=-0.12),
        yaxis=dict(autorange="reversed", title="query", tickvals=pos[::step], ticktext=text[::step]),
        xaxis=dict(title="key", tickvals=pos[::step], ticktext=text[::step], tickangle=-60),
    )
    return fig


def cih_report_path() -> Path:
    import os

    return Path(os.environ.get("FRA_CIH_REPORT", "reports/cih/cih.json"))

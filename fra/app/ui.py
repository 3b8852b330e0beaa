"""Streamlit helpers of the explorer: cached queries, URL-bound widgets, tables with labels, links
and downloads, and attention maps.

URL state, both ways, with a browser history that works:
- At the start of a run, `adopt_url` compares the address bar with what the app last wrote. If they
  differ (first load, Back / Forward, a link), the address is the truth and every URL-bound widget
  is set from it (the value checked by `fra.app.state`; a bad value is replaced by the default with
  a warning that says what is available). Otherwise the widgets are the truth.
- After the page is drawn, `sync_url` writes the widgets' state to the address bar. Streamlit pushes
  a new history entry when the query string changes (and replaces it while it replays Back /
  Forward), so every view the user makes is one step of the browser history.
- Links stay in the tab and the session: `goto` (cells of tables and of the attention map, through
  selection callbacks) and `nav` (link-styled buttons).
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
from fra.app.state import describe, pick_int, query_string
from fra.app.text import readable_label, readable_tokens
from fra.queries import connect
from fra.queries import manifest as read_manifest
from fra.queries.lib import INDEX_LACKS, attach_optional, run


class QueryFailed(RuntimeError):
    """A named query failed because the index lacks what it reads (shown as a message)."""


class Refused(Exception):
    """The URL asks for something the index does not hold and that nothing else may stand in for
    (a layer it did not index): the page says so, offers `links`, and shows nothing else."""

    def __init__(self, message: str, links: list[tuple[str, dict]]):
        super().__init__(message)
        self.links = links


# ------------------------------------------------------------------------------ queries


@st.cache_resource
def _open(path: str):
    """One read-only DuckDB connection, shared (every query takes its own cursor), and the optional
    tables and views it has (`fra.queries.lib.attach_optional`)."""
    con = connect(path)
    return con, frozenset(attach_optional(con, path))


def connection(path: str):
    return _open(path)[0]


def _optional(path: str) -> frozenset[str]:
    return _open(path)[1]


@st.cache_data(show_spinner=False, max_entries=512)
def _cached(path: str, name: str, params: tuple) -> pd.DataFrame:
    return run(connection(path), name, list(params))


def q(name: str, *params) -> pd.DataFrame:
    """A named query of queries/named.sql over the index (results cached: the index is read-only)."""
    try:
        return _cached(str(st.session_state["_index"]), name, tuple(params)).copy()
    except INDEX_LACKS as exc:
        raise QueryFailed(f"query `{name}` failed on this index: {str(exc).splitlines()[0]}") from exc


@st.cache_data(show_spinner=False, max_entries=4)
def _manifest(path: str) -> dict:
    return read_manifest(path)


def manifest() -> dict:
    """The index's manifest (model, policy with min_count and top_keys, layers, ...)."""
    return _manifest(str(st.session_state["_index"]))


def has(name: str) -> bool:
    """Whether the index has an optional table or view (`example_terms`, `activations`, the marginals)."""
    return name in _optional(str(st.session_state["_index"]))


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
    except INDEX_LACKS as exc:
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


def attention_link(layer: int, head: int, sample: int, qpos: int, kpos: int, fq=None, fk=None) -> str:
    """The Head page at one score; with (fq, fk), the channel the user came from is shown there."""
    return link(
        "Head",
        layer=int(layer),
        head=int(head),
        sample=int(sample),
        q=int(qpos),
        k=int(kpos),
        fq=None if fq is None else int(fq),
        fk=None if fk is None else int(fk),
    )


def parse_link(target: str) -> dict | None:
    """`?page=X&a=1` -> {'page': 'X', 'a': '1'} (None for anything that is not an app link)."""
    from urllib.parse import parse_qsl

    if not isinstance(target, str) or not target.startswith("?page="):
        return None
    return dict(parse_qsl(target[1:], keep_blank_values=True))


def params() -> dict[str, str]:
    """The URL parameters this run reads: the target of a link clicked in this session (`goto`), else
    the address bar."""
    return st.session_state.get("_goto") or st.query_params.to_dict()


def url_param(name: str, default=None):
    return params().get(name, default)


def adopt_url() -> bool:
    """Start of a run: after a link in the app (`goto`), or if the address bar is not what this session
    last wrote (first load, Back / Forward), every URL-bound widget is set from the URL in this run.
    Returns whether it was."""
    adopt = bool(st.session_state.get("_goto")) or st.session_state.get("_written") != st.query_params.to_dict()
    st.session_state["_adopt"] = adopt
    st.session_state["_from_url"] = set()  # widgets already set from the URL in this run
    if adopt:  # fresh tables and charts: no selection of the previous view survives into this one
        st.session_state["_epoch"] = st.session_state.get("_epoch", 0) + 1
    return adopt


def epoch() -> int:
    return st.session_state.get("_epoch", 0)


def sync_url(page: str) -> None:
    """Write this run's state into the address bar (Streamlit pushes a history entry when it changes)."""
    want = {"page": page, **{k: str(v) for k, v in url().items() if v is not None}}
    if st.query_params.to_dict() != want:
        st.query_params.from_dict(want)
    st.session_state["_written"] = want
    st.session_state.pop("_goto", None)


def goto(target: dict | str) -> None:
    """Navigate in this tab and session (from a widget callback). The run that follows reads the
    target's parameters and writes the address once, completed with the page's defaults, so that a
    link makes one step of the browser history."""
    target = parse_link(target) if isinstance(target, str) else target
    if target:
        st.session_state["_goto"] = {k: str(v) for k, v in target.items() if v is not None}


def nav(container, label: str, target: str, help: str | None = None) -> None:
    """A link that stays in this tab and session: a link-styled button that navigates with `goto`."""
    container.button(
        label, key=f"nav_{target}_{label}", on_click=goto, args=(target,), type="tertiary", help=help or target
    )


def _init(wkey: str, param: str, options: Sequence, default, what: str, fallback: str = "") -> None:
    """Set a widget's state from the URL when the URL is the truth (see adopt_url) or the widget is
    new, else keep it valid."""
    done = st.session_state.setdefault("_from_url", set())
    if (st.session_state.get("_adopt") and wkey not in done) or wkey not in st.session_state:
        choice = pick_int(url_param(param), param, options, default, what, fallback)
        if choice.problem:
            st.warning(choice.problem)
        st.session_state[wkey] = choice.value
        done.add(wkey)
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
    on_change: Callable | None = None,
) -> int:
    """A selectbox whose value lives in URL parameter `param`."""
    options = list(options)
    _init(key, param, options, default, what, fallback)
    value = container.selectbox(
        label, options, key=key, format_func=fmt or str, help=help or HELP.get(param), on_change=on_change
    )
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
    if st.session_state.get("_adopt") or key not in st.session_state:
        raw = url_param(param)
        if raw is not None and raw not in options:
            st.warning(f"{param}={raw!r} is not one of {', '.join(options)}. Showing {default}.")
        st.session_state[key] = raw if raw in options else default
    value = container.radio(label, options, key=key, horizontal=horizontal, help=help)
    url()[param] = value
    return value


def toggle(container, label: str, param: str, default: bool, key: str, help: str | None = None) -> bool:
    """A toggle whose value lives in URL parameter `param` (1 / 0)."""
    if st.session_state.get("_adopt") or key not in st.session_state:
        raw = url_param(param)
        if raw not in (None, "", "0", "1"):
            st.warning(f"{param}={raw!r} is not 0 or 1. Showing {int(default)}.")
        st.session_state[key] = default if raw not in ("0", "1") else raw == "1"
    value = container.toggle(label, key=key, help=help)
    url()[param] = int(value)
    return bool(value)


def indexed_layer(page: str, lh: dict[int, list[int]], default: int) -> int:
    """The URL's layer if the index has it; a layer it lacks is refused (never replaced by another)."""
    layers = sorted(lh)
    raw = url_param("layer")
    if (st.session_state.get("_adopt") or f"{page}_layer" not in st.session_state) and raw not in (None, ""):
        choice = pick_int(raw, "layer", layers, default, "layers of this index")
        if choice.problem:
            keep = {k: v for k, v in params().items() if k != "layer"}
            raise Refused(
                f"layer={raw} is not indexed: this index has layer{'s' if len(layers) > 1 else ''} "
                f"{describe(layers)}. Nothing is shown in its place; open one of them:",
                [(f"layer {l}", {**keep, "layer": l}) for l in layers],
            )
    return default


def layer_head(page_key: str, default_layer: int | None = None) -> tuple[int, int]:
    lh = layers_heads()
    layers = sorted(lh)
    d = indexed_layer(page_key, lh, default_layer if default_layer in lh else layers[0])
    c1, c2 = st.columns(2)
    layer = select_int(c1, "layer", "layer", layers, d, "layers of this index", f"{page_key}_layer")
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


def cell_targets(
    df: pd.DataFrame, columns: Sequence[str], feature_cols: Sequence[str], layer, open_col: str | None
) -> dict[tuple[int, str], dict]:
    """Where a click on each cell goes: a feature id to its feature page, the 'open' cell (an app link)
    to its page, and any other cell of that row to the row's 'open' target."""
    out: dict[tuple[int, str], dict] = {}
    opens = [parse_link(v) for v in df[open_col]] if open_col and open_col in df else [None] * len(df)
    layers = df[layer].tolist() if isinstance(layer, str) and layer in df else [layer] * len(df)
    for i in range(len(df)):
        for c in columns:
            if c in feature_cols and layers[i] is not None and pd.notna(df[c].iloc[i]):
                out[(i, c)] = parse_link(feature_link(layers[i], int(df[c].iloc[i])))
            elif opens[i]:
                out[(i, c)] = opens[i]
    return out


def _on_cell(key: str, targets: dict[tuple[int, str], dict]) -> None:
    cells = st.session_state[key].selection.get("cells") or []
    if cells:
        row, col = cells[0]
        target = targets.get((int(row), str(col)))
        if target:
            goto(target)


def show_table(
    df: pd.DataFrame,
    columns: Sequence[str],
    key: str,
    feature_cols=("feat_q", "feat_k", "feature", "partner"),
    layer: int | str | None = None,
    open_col: str | None = "open",
    height: int | None = None,
    helps: dict[str, str] | None = None,
) -> None:
    """A table with help on every column (`helps` overrides the glossary) and visible CSV / Parquet
    downloads of the data shown. Clicking a cell opens, in this tab, the feature of a feature id or
    the row's 'open' target (an app link from `link`; cells that hold other text go nowhere)."""
    columns = [c for c in columns if c in df.columns]
    data = df[columns].reset_index(drop=True)
    targets = cell_targets(df.reset_index(drop=True), columns, feature_cols, layer, open_col)
    view = data.copy()
    if open_col in view:
        view[open_col] = [
            "open ▸" if parse_link(v) else ("" if v is None or pd.isna(v) else str(v)) for v in view[open_col]
        ]
    cfg = {}
    for c in columns:
        h = (helps or {}).get(c) or HELP.get(c)
        if c == open_col:
            cfg[c] = st.column_config.TextColumn(c, help=h or HELP["open"])
        elif "share" in c and pd.api.types.is_float_dtype(data[c]):
            cfg[c] = st.column_config.NumberColumn(c, help=h, format="percent")
        elif pd.api.types.is_float_dtype(data[c]):
            cfg[c] = st.column_config.NumberColumn(c, help=h, format="%.4g")
        elif c in feature_cols and layer is not None:
            cfg[c] = st.column_config.NumberColumn(c, help=(h or "") + " Click to open the feature.", format="%d")
        elif h:
            cfg[c] = st.column_config.Column(c, help=h)
    wkey = f"tbl_{key}_{epoch()}"
    st.session_state[f"_targets_{key}"] = targets
    st.dataframe(
        view,
        hide_index=True,
        column_config=cfg,
        width="stretch",
        height=height or "auto",
        key=wkey,
        on_select=(lambda: _on_cell(wkey, st.session_state.get(f"_targets_{key}", {}))) if targets else "ignore",
        selection_mode="single-cell",
    )
    downloads(data.drop(columns=[c for c in (open_col,) if c in data]), key)


def downloads(df: pd.DataFrame, key: str) -> None:
    row = st.container(horizontal=True)
    row.download_button(
        "⬇ CSV",
        df.to_csv(index=False).encode(),
        file_name=f"{key}.csv",
        mime="text/csv",
        key=f"dl_{key}_csv",
        on_click="ignore",
    )
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    row.download_button(
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
            hoverinfo="skip",
        )
    )
    # Plotly cannot select heatmap cells, so an invisible marker on every causal cell takes the click
    # (Streamlit's point selection) and the hover.
    cells = [(a, b) for a in pos for b in pos if b <= a and np.isfinite(z[a, b])]
    fig.add_trace(
        go.Scatter(
            x=[b for _, b in cells],
            y=[a for a, _ in cells],
            mode="markers",
            name="cells",
            showlegend=False,
            marker=dict(symbol="square", size=max(4, min(14, 700 // max(len(pos), 1))), opacity=0),
            customdata=[[a, b, f"q {text[a - lo]} → k {text[b - lo]}", float(z[a, b])] for a, b in cells],
            hovertemplate="%{customdata[2]}<br>%{customdata[3]:.4g}<br>click to select<extra></extra>",
            selected=dict(marker=dict(opacity=0)),
            unselected=dict(marker=dict(opacity=0)),
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
        clickmode="event+select",
        yaxis=dict(autorange="reversed", title="query", tickvals=pos[::step], ticktext=text[::step]),
        xaxis=dict(title="key", tickvals=pos[::step], ticktext=text[::step], tickangle=-60),
    )
    return fig


def clicked_cell(key: str) -> tuple[int, int] | None:
    """The (q, k) of the attention-map cell clicked (Streamlit's point selection), if any."""
    pts = st.session_state[key].selection.get("points") or []
    for p in pts:
        cd = p.get("customdata")
        if cd is not None and len(cd) >= 2:
            return int(cd[0]), int(cd[1])
    return None


TERM_ORDER = ("pair", "ff_rest", "b_dec", "error", "bias")


def waterfall(terms: pd.DataFrame, score: float, title: str) -> go.Figure:
    """The score as a waterfall of its terms (absolute values that add up to it, never shares).

    `terms` has `name` and `value`; the last bar is the score itself, drawn as a total so that the
    reader sees the steps land on it."""
    fig = go.Figure(
        go.Waterfall(
            orientation="v",
            x=list(terms["name"]) + ["score"],
            y=list(terms["value"]) + [score],
            measure=["relative"] * len(terms) + ["total"],
            text=[f"{v:+.3f}" for v in terms["value"]] + [f"{score:.3f}"],
            textposition="outside",
            connector=dict(line=dict(color="#999", width=1)),
            increasing=dict(marker=dict(color="#2b8cbe")),
            decreasing=dict(marker=dict(color="#e34a33")),
            totals=dict(marker=dict(color="#555")),
            hovertemplate="%{x}<br>%{y:+.4f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=title,
        height=380,
        margin=dict(l=10, r=10, t=40, b=10),
        yaxis_title="contribution to the score",
        xaxis=dict(tickangle=-30),
        showlegend=False,
    )
    return fig


def cih_report_path() -> Path:
    import os

    return Path(os.environ.get("FRA_CIH_REPORT", "reports/cih/cih.json"))

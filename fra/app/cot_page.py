"""The CoT page: a chain of thought as sentences, the sentence x sentence attention of a chosen
head, and the feature-pair channels that carry a chosen cell, each linked to its channel page.

Reads the Parquet tables that `fra report cot` writes (reports/cot/, or FRA_COT_REPORT); never
imports torch. URL: ?page=CoT&trace=3&layer=18&head=6&i=7&j=2.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from fra.app import ui
from fra.app.text import md_text

TABLES = ("traces", "sentences", "matrices", "heads", "cells", "cell_channels", "anchors", "anchor_channels")

HELPS = {
    "i": "The query sentence (row of the matrix).",
    "j": "The key sentence (column of the matrix).",
    "text": "The sentence, as pysbd split the trace.",
    "receiver_score": "Mean vertical score over the receiver heads: how much sentences >= 4 later attend to it.",
    "suppression_score": "Mean log-KL on sentences >= 4 later when this sentence's keys are suppressed everywhere.",
    "rank": "Rank of the channel by |value| in this cell.",
    "value": "The channel's part of the cell's score advantage Delta (anchor part minus baseline part).",
    "anchor_part": "Attention-weighted FA of the channel on this block of keys.",
    "baseline_part": "The same queries' attention-weighted FA of the channel over all their keys.",
    "group": "A component group of the score: ff = feature x feature; b_dec, error and bias terms.",
    "split": "The group's part of Delta; the rows sum to Delta.",
}


def report_dir() -> Path:
    return Path(os.environ.get("FRA_COT_REPORT", "reports/cot"))


@st.cache_data(show_spinner=False, max_entries=4)
def _load(path: str, mtime: float) -> dict[str, pd.DataFrame]:
    return {t: pd.read_parquet(Path(path) / f"{t}.parquet") for t in TABLES if (Path(path) / f"{t}.parquet").exists()}


def tables() -> dict[str, pd.DataFrame] | None:
    d = report_dir()
    if not (d / "sentences.parquet").exists():
        return None
    return _load(str(d.resolve()), (d / "sentences.parquet").stat().st_mtime)


def _matrix(m: np.ndarray, i: int, j: int, title: str):
    n = m.shape[0]
    fig = go.Figure(
        go.Heatmap(
            z=m,
            x=list(range(n)),
            y=list(range(n)),
            colorscale="Magma",
            hoverongaps=False,
            hovertemplate="query sentence %{y}<br>key sentence %{x}<br>%{z:.4f}<extra></extra>",
        )
    )
    fig.add_shape(type="rect", x0=j - 0.5, x1=j + 0.5, y0=i - 0.5, y1=i + 0.5, line=dict(color="cyan", width=2))
    fig.update_layout(
        title=title,
        height=420,
        margin=dict(l=10, r=10, t=40, b=10),
        xaxis_title="key sentence j",
        yaxis_title="query sentence i",
        yaxis_autorange="reversed",
    )
    return fig


def _pick_trace(tr: pd.DataFrame) -> int:
    """The trace selector and the trace's problem; returns the trace id."""
    used = tr[tr["used"]].set_index("trace")
    ids = [int(x) for x in used.index]
    trace = ui.select_int(
        st,
        "trace",
        "trace",
        ids,
        ids[0],
        "traces of this report",
        "cot_trace",
        fmt=lambda x: (
            f"{x}: {'correct' if used.loc[x, 'correct'] else 'wrong'}, {used.loc[x, 'task']}: "
            f"{str(used.loc[x, 'problem'])[:60]}"
        ),
    )
    row = used.loc[trace]
    st.markdown(
        f"**Problem.** {md_text(str(row['problem']))}  \n**Expected** {md_text(str(row['answer']))}, "
        f"**extracted** {md_text(str(row['predicted']))}: {'correct' if row['correct'] else 'wrong'}"
    )
    return trace


def _pick_head(heads: pd.DataFrame) -> tuple[int, int]:
    """The layer and head selectors and the head's caption; returns (layer, head)."""
    resolved = heads[heads["resolved"]]
    default = (int(resolved.iloc[0].layer), int(resolved.iloc[0]["head"])) if len(resolved) else (0, 0)
    layers = sorted(int(x) for x in heads["layer"].unique())
    c1, c2 = st.columns(2)
    layer = ui.select_int(c1, "layer", "layer", layers, default[0], "layers of the model", "cot_layer")
    hs = sorted(int(x) for x in heads[heads["layer"] == layer]["head"])
    head = ui.select_int(
        c2, "head", "head", hs, default[1] if default[1] in hs else hs[0], f"heads of layer {layer}", "cot_head"
    )
    hrow = heads[(heads.layer == layer) & (heads["head"] == head)].iloc[0]
    st.caption(
        f"Head {layer}.{head}: mean kurtosis of vertical scores {hrow.mean_kurtosis:.2f}"
        + (f", receiver head #{int(hrow.receiver_rank) + 1}" if hrow.receiver_rank >= 0 else ", not a receiver head")
        + (
            "; its cells are resolved into channels."
            if hrow.resolved
            else "; channels are stored for the resolved heads: "
            + ", ".join(f"{int(a)}.{int(b)}" for a, b in zip(resolved.layer, resolved["head"]))
            + "."
        )
    )
    return layer, head


def _attention(mat: pd.DataFrame, trace: int, layer: int, head: int, n: int) -> np.ndarray:
    """[n, n] mean attention weights of the head on the trace (NaN above the diagonal)."""
    mat = mat[(mat.trace == trace) & (mat.layer == layer) & (mat["head"] == head)]
    m = np.full((n, n), np.nan)
    m[mat["i"].to_numpy(), mat["j"].to_numpy()] = mat["attn"].to_numpy()
    return m


def _pick_cell(n: int) -> tuple[int, int]:
    """The cell (i, j): a click on the matrix (from the previous run) sets it, before its widgets are drawn."""
    sel = st.session_state.get("cot_matrix")
    pts = list(sel["selection"]["points"]) if sel and sel.get("selection") else []
    if pts:
        pick = (int(pts[0]["y"]), int(pts[0]["x"]))
        if pick != st.session_state.get("cot_last_pick") and 0 <= pick[1] <= pick[0] < n:
            st.session_state["cot_i"], st.session_state["cot_j"] = pick
        st.session_state["cot_last_pick"] = pick
    c1, c2 = st.columns(2)
    i = ui.number_int(c1, "query sentence i", "i", n, n - 1, "sentences of this trace", "cot_i", help=HELPS["i"])
    j = ui.number_int(c2, "key sentence j", "j", n, 0, "sentences of this trace", "cot_j", help=HELPS["j"])
    if j > i:
        st.warning(f"Sentence {i} cannot attend to the later sentence {j}: showing j = 0.")
        j = 0
        ui.url()["j"] = 0
    return i, j


def _show_matrix(m: np.ndarray, s: pd.DataFrame, layer: int, head: int, i: int, j: int) -> None:
    st.plotly_chart(
        _matrix(m, i, j, f"head {layer}.{head}: mean attention weight, sentence i -> sentence j (click a cell)"),
        key="cot_matrix",
        on_select="rerun",
        selection_mode="points",
    )
    st.markdown(
        f"**i = {i}:** {md_text(str(s.iloc[i]['text']).strip())}  \n"
        f"**j = {j}:** {md_text(str(s.iloc[j]['text']).strip())}  \n"
        f"mean attention weight {m[i, j]:.4f}"
    )


def _cell_channels(t: dict[str, pd.DataFrame], trace: int, layer: int, head: int, i: int, j: int) -> None:
    """The cell's split of Delta into groups and its channels, or why none are stored."""
    cells = t.get("cells", pd.DataFrame())
    cell = cells[
        (cells.trace == trace) & (cells.layer == layer) & (cells["head"] == head) & (cells.i == i) & (cells.j == j)
    ]
    if not len(cell):
        st.info(
            "No channels are stored for this cell: "
            + (
                "the diagonal is not resolved (queries and keys in the same sentence)."
                if i == j
                else f"head {layer}.{head} is not one of the resolved heads."
            )
        )
        return
    c = cell.iloc[0]
    groups = [g[2:] for g in cell.columns if g.startswith("g_")]
    st.markdown(
        f"Score advantage of sentence {j}'s keys for sentence {i}'s queries: **Delta = {c.delta:.4f}**, "
        "split exactly into:"
    )
    ui.show_table(
        pd.DataFrame({"group": groups, "split": [float(c[f"g_{g}"]) for g in groups]}),
        ["group", "split"],
        "cot_groups",
        helps=HELPS,
    )
    ch = t["cell_channels"]
    ch = ch[(ch.trace == trace) & (ch.layer == layer) & (ch["head"] == head) & (ch.i == i) & (ch.j == j)].copy()
    ch["open"] = [ui.channel_link(layer, head, a, b) for a, b in zip(ch.feat_q, ch.feat_k)]
    st.markdown(f"The {len(ch)} channels of largest |value| (of the ff group {c.g_ff:.4f}):")
    ui.show_table(
        ch.sort_values("rank"),
        ["rank", "feat_q", "feat_k", "value", "anchor_part", "baseline_part", "open"],
        "cot_channels",
        layer=layer,
        helps=HELPS,
    )


def _anchor_channels(t: dict[str, pd.DataFrame], trace: int, layer: int, head: int) -> None:
    """The channels behind the trace's top anchors, for the chosen head (if it is resolved)."""
    anc = t.get("anchor_channels", pd.DataFrame())
    if not len(anc):
        return
    a = anc[(anc.trace == trace) & (anc.layer == layer) & (anc["head"] == head)].copy()
    if not len(a):
        return
    st.subheader("Channels behind this trace's top anchors (queries >= 4 sentences later)")
    a["open"] = [ui.channel_link(layer, head, x, y) for x, y in zip(a.feat_q, a.feat_k)]
    ui.show_table(
        a,
        ["anchor", "rank", "feat_q", "label_q", "feat_k", "label_k", "cls", "key_tokens", "value", "open"],
        "cot_anchor_channels",
        layer=layer,
        helps={
            **HELPS,
            "anchor": "The anchor sentence (top receiver score).",
            "cls": "content: the key token is a number or word the later sentences reuse; "
            "word: alphanumeric, not reused; structural: punctuation, whitespace, format.",
            "key_tokens": "The anchor tokens where the channel's key side carries the most.",
            "label_q": "Query feature's label.",
            "label_k": "Key feature's label.",
        },
    )


def _figures() -> None:
    for fig in ("receiver_heads.png", "consistency.png"):
        if (report_dir() / fig).exists():
            st.image(str(report_dir() / fig), caption=fig, width=560)


def page_cot() -> None:
    st.header("CoT: thought anchors, feature-resolved")
    t = tables()
    if t is None:
        st.info(f"No CoT report at {report_dir()}. Run `fra report cot` first (or set FRA_COT_REPORT).")
        return
    trace = _pick_trace(t["traces"])
    layer, head = _pick_head(t["heads"])
    sent = t["sentences"]
    s = sent[sent.trace == trace].sort_values("i")
    n = len(s)
    m = _attention(t["matrices"], trace, layer, head, n)
    i, j = _pick_cell(n)
    _show_matrix(m, s, layer, head, i, j)
    _cell_channels(t, trace, layer, head, i, j)
    st.subheader("Sentences")
    ui.show_table(s, ["i", "text", "receiver_score", "suppression_score"], "cot_sentences", helps=HELPS)
    _anchor_channels(t, trace, layer, head)
    _figures()

"""The explorer's CoT page on Parquet tables with the columns `fra report cot` writes, through AppTest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "fra" / "app" / "main.py")
GROUPS = ("ff", "f_bdec", "f_err", "bdec_f", "err_f", "resid_resid", "bias")


@pytest.fixture
def cot_report(tmp_path):
    """Two traces of 3 and 4 sentences; head 1.2 is resolved, cell (2, 0) of trace 7 has 2 channels."""
    d = tmp_path / "cot"
    d.mkdir()
    pd.DataFrame(
        dict(
            trace=[5, 7],
            task=["chain_sum", "basic_arithmetic"],
            correct=[False, True],
            problem=["1 + 5 =", "Calculate 2 + 3."],
            answer=["6", "5"],
            predicted=["7", "5"],
            n_new_tokens=[20, 30],
            trace_text=["a. b. c.", "a. b. c. d."],
            used=[True, True],
        )
    ).to_parquet(d / "traces.parquet")
    sents = [
        dict(trace=5, i=i, text=f"s{i}. ", tok_start=i, tok_end=i + 1, receiver_score=0.1, suppression_score=-3.0)
        for i in range(3)
    ]
    sents += [
        dict(
            trace=7,
            i=i,
            text=f"Step {i} adds 2 and 3. ",
            tok_start=2 * i,
            tok_end=2 * i + 2,
            receiver_score=0.1 * i,
            suppression_score=-2.0,
        )
        for i in range(4)
    ]
    pd.DataFrame(sents).to_parquet(d / "sentences.parquet")
    mats = []
    for tr, n in ((5, 3), (7, 4)):
        ii, jj = np.tril_indices(n)
        for l in range(2):
            for h in range(4):
                mats.append(pd.DataFrame(dict(trace=tr, layer=l, head=h, i=ii, j=jj, attn=(ii + jj + h) / 10.0)))
    pd.concat(mats).to_parquet(d / "matrices.parquet")
    pd.DataFrame(
        [
            dict(
                layer=l,
                head=h,
                mean_kurtosis=float(l + h),
                receiver_rank=(7 - 4 * l - h) % 8,
                resolved=(l, h) == (1, 2),
            )
            for l in range(2)
            for h in range(4)
        ]
    ).to_parquet(d / "heads.parquet")
    pd.DataFrame(
        [
            dict(
                trace=7,
                layer=1,
                head=2,
                i=2,
                j=0,
                attn=0.4,
                delta=1.5,
                **{f"g_{g}": v for g, v in zip(GROUPS, (1.0, 0.2, 0.1, 0.1, 0.05, 0.05, 0.0))},
            )
        ]
    ).to_parquet(d / "cells.parquet")
    pd.DataFrame(
        [
            dict(
                trace=7,
                layer=1,
                head=2,
                i=2,
                j=0,
                rank=r,
                feat_q=fq,
                feat_k=fk,
                value=v,
                anchor_part=v,
                baseline_part=0.0,
            )
            for r, (fq, fk, v) in enumerate(((3, 11, 0.7), (4, 12, 0.2)))
        ]
    ).to_parquet(d / "cell_channels.parquet")
    return d


def open_cot(tiny_index, monkeypatch, report, **params) -> AppTest:
    monkeypatch.setenv("FRA_INDEX", str(tiny_index))
    monkeypatch.setenv("FRA_COT_REPORT", str(report))
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params["page"] = "CoT"
    for k, v in params.items():
        at.query_params[k] = str(v)
    return at.run()


def test_cot_page_shows_a_cells_channels_with_links(tiny_index, monkeypatch, cot_report):
    at = open_cot(tiny_index, monkeypatch, cot_report, trace=7, layer=1, head=2, i=2, j=0)
    assert not at.exception and not at.error and not at.warning
    assert at.header[0].value.startswith("CoT")
    assert at.number_input(key="cot_i").value == 2 and at.number_input(key="cot_j").value == 0
    text = " ".join(m.value for m in at.markdown)
    assert "i = 2:** Step 2 adds 2 and 3" in text and "j = 0:** Step 0 adds 2 and 3" in text
    assert "Delta = 1.5000" in text
    frames = [df.value for df in at.dataframe]
    groups = next(f for f in frames if "group" in f.columns)
    assert groups["split"].sum() == pytest.approx(1.5)
    channels = next(f for f in frames if "open" in f.columns)
    assert list(channels["value"]) == [0.7, 0.2]
    # a click on the row's cells opens its channel page (ui.show_table's click targets)
    link = at.session_state["_targets_cot_channels"][(0, "value")]
    assert {k: str(v) for k, v in link.items()} == {"page": "Channel", "layer": "1", "head": "2", "fq": "3", "fk": "11"}
    assert dict(at.query_params) | {} and at.query_params["trace"] == "7" and at.query_params["i"] == "2"


def test_cot_page_explains_unresolved_heads_and_bad_cells(tiny_index, monkeypatch, cot_report):
    at = open_cot(tiny_index, monkeypatch, cot_report, trace=7, layer=0, head=1, i=3, j=1)
    assert not at.exception
    assert any("not one of the resolved heads" in m.value for m in at.info)
    at = open_cot(tiny_index, monkeypatch, cot_report, trace=7, layer=1, head=2, i=1, j=3)
    assert any("cannot attend to the later sentence" in w.value for w in at.warning)
    at = open_cot(tiny_index, monkeypatch, cot_report, trace=99)
    assert any("trace=99" in w.value for w in at.warning) and at.query_params["trace"] == "5"


def test_cot_page_without_a_report_says_how_to_make_one(tiny_index, monkeypatch, tmp_path):
    at = open_cot(tiny_index, monkeypatch, tmp_path / "none")
    assert not at.exception
    assert any("fra report cot" in m.value for m in at.info)

"""The Streamlit explorer on a tiny real index, through streamlit.testing.v1.AppTest."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parent.parent / "app" / "main.py")
PAGES = ("Feature search", "Head", "Channel", "Sample", "CIH")


@pytest.fixture
def app(tiny_index, monkeypatch, tmp_path):
    monkeypatch.setenv("FRA_INDEX", str(tiny_index))
    monkeypatch.setenv("FRA_CIH_REPORT", str(tmp_path / "missing.json"))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def errors(at):
    return [e.value for e in at.error] + [str(e.value) for e in at.exception]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(app, page):
    app.sidebar.radio(key="page").set_value(page).run()
    assert not errors(app)
    assert app.header[0].value.lower().startswith(page.split()[0].lower()[:4]) or page == "CIH"


def test_search_finds_a_known_feature(app, tiny_index):
    from fra.queries import connect

    fq = connect(tiny_index).execute(
        "SELECT feat_q FROM channels WHERE layer = 0 GROUP BY 1 ORDER BY count(*) DESC LIMIT 1").fetchone()[0]
    app.text_input(key="feature_id").set_value(str(fq)).run()
    assert not errors(app)
    assert f"Feature {fq} (layer 0)" in app.subheader[0].value
    assert len(app.dataframe) >= 1  # its channels
    assert fq in set(app.dataframe[0].value["feat_q"]) | set(app.dataframe[0].value["feat_k"])


@pytest.mark.parametrize("bad", ["abc", "999999", "-3", "1.5"])
def test_bad_feature_id_is_a_friendly_message(app, bad):
    app.text_input(key="feature_id").set_value(bad).run()
    assert not errors(app)
    assert app.warning and ("not a feature ID" in app.warning[0].value or "does not exist" in app.warning[0].value)


@pytest.mark.parametrize("evil", ["1; DROP TABLE rows; --", "1 OR 1=1", "'); DELETE FROM channels; --"])
def test_sql_injection_strings_do_no_harm(app, tiny_index, evil):
    from fra.queries import connect

    before = connect(tiny_index).execute("SELECT count(*) FROM channels").fetchone()[0]
    app.text_input(key="feature_id").set_value(evil).run()
    assert not errors(app)
    assert "not a feature ID" in app.warning[0].value
    assert connect(tiny_index).execute("SELECT count(*) FROM channels").fetchone()[0] == before


def test_channel_page_shows_stats_for_a_stored_channel(app, tiny_index):
    from fra.queries import connect

    l, h, fq, fk = connect(tiny_index).execute(
        "SELECT layer, head, feat_q, feat_k FROM rows ORDER BY abs(value) DESC LIMIT 1").fetchone()
    app.sidebar.radio(key="page").set_value("Channel").run()
    app.selectbox(key="chan_layer").set_value(l).run()
    app.selectbox(key="chan_head").set_value(h).run()
    app.number_input(key="chan_fq").set_value(fq).run()
    app.number_input(key="chan_fk").set_value(fk).run()
    assert not errors(app)
    assert any("mean-when-active" in m.value for m in app.markdown)


def test_cih_page_reads_a_report(tiny_index, monkeypatch, tmp_path):
    rep = {"answers": {"summary": {"H1": "no"}}, "tih": ["1.2"], "layers": {"1": {"tests": [
        {"head": 2, "family": "concept", "feat_q": 3, "feat_k": 4, "margin_B": 0.5, "shifted_B": 0.1,
         "control_B": 0.0, "q": 0.01, "cih": True}]}}}
    (tmp_path / "cih.json").write_text(json.dumps(rep))
    monkeypatch.setenv("FRA_INDEX", str(tiny_index))
    monkeypatch.setenv("FRA_CIH_REPORT", str(tmp_path / "cih.json"))
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    at.sidebar.radio(key="page").set_value("CIH").run()
    assert not errors(at)
    assert at.dataframe[0].value["feat_q"].tolist() == [3]


def test_app_never_imports_torch():
    tree = ast.parse(Path(APP).read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any("torch" in (m or "") for m in names | mods)

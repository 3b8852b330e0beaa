"""The explorer's CIH page on a cih.json written through the study's schema: answers first, the
report's own feature labels, links only to layers the open index holds, and a clear error for a
report of another format."""

from __future__ import annotations

import json
from pathlib import Path

from fra.ingest.studies.cih import schema
from tests.test_app import errors, make_app


def write_cih_json(path: Path, layers=(1, 17), chosen="query") -> schema.CIHResults:
    """A small report: one answer per relation, verdicts and units on an indexed layer (the first)
    and on one the tiny index does not hold (the second)."""
    a, b = layers
    res = schema.CIHResults(
        model="tiny", model_text="a tiny model", sae_text="tiny SAEs", layers=list(layers), seeds=[0, 1],
        tih=[f"{a}.2", f"{b}.3"], chosen_unit=chosen,
        positive_control=[schema.PositiveControl("query", True, True, f"{a}.2,{b}.3", 0.5, 1.0),
                          schema.PositiveControl("channel", False, False, "", 0.03, 0.3)],
        answers=[schema.Answer(r, k, "query", 2, h, h, "", "", "", "", "") for r, k, h in
                 (("identity", "positive control", "yes"), ("synonym", "conceptual", "no"))],
        verdicts=[schema.Verdict("synonym", "query", L, h, f"{L}.{h}", True, 2, 1, 2, True, False, 0.4, 2.0, 0.6,
                                 0.1, 0.1, 0.2, 0.0, 0.5) for L, h in ((a, 2), (b, 3))],
        channels=[schema.Channel(a, 3, -1, "report label A", "", f"{a}.2", 5, 2, 0.3, 1.0, 0.1, "matching",
                                 "recurrent"),
                  schema.Channel(b, 2004, -1, "after a related word", "", f"{b}.3", 4, 2, 0.2, 1.0, 0.9,
                                 "gated query", "structural")],
        behaviour=[schema.Behaviour("synonym", "all", 10, -3.0, 2.0, 1.0, 3.0, 0.1)],
        pairs={"synonym": {"available": 142}}, config={}, tables={}, seconds=1.0, max_abs_residual=1e-6,
    )  # fmt: skip
    schema.save(res, path)
    return res


def test_cih_page_shows_answers_first_with_report_labels_and_indexed_links_only(tiny_index, monkeypatch, tmp_path):
    write_cih_json(tmp_path / "cih.json")
    at = make_app(tiny_index, monkeypatch, tmp_path / "cih.json", page="CIH")
    assert not errors(at)
    assert [h.value for h in at.subheader][0] == "Answers"
    answers = at.dataframe[0].value
    assert answers["relation"].tolist() == ["identity", "synonym"] and answers["h1"].tolist() == ["yes", "no"]
    units = next(d.value for d in at.dataframe if "label_q" in d.value.columns)
    # the report's own labels, not the index's
    assert units["label_q"].tolist() == ["report label A", "after a related word"]
    # layer 1 is in the tiny index: a link; layer 17 is not: none
    # (a click on a row opens its target: ui.show_table's click targets, by (row, column))
    unit_targets = at.session_state["_targets_cih_units"]
    assert unit_targets[(0, "open")] == {"page": "Feature search", "layer": "1", "feature": "3"}
    assert units["open"].tolist() == ["open ▸", ""]  # no link to layer 17
    assert (1, "open") not in unit_targets
    verdict_targets = at.session_state["_targets_cih_verdicts"]
    assert verdict_targets[(0, "open")] == {"page": "Head", "layer": "1", "head": "2"}
    assert (1, "open") not in verdict_targets
    assert any("not in this index" in c.value for c in at.caption)


def test_cih_page_says_when_the_positive_control_failed(tiny_index, monkeypatch, tmp_path):
    write_cih_json(tmp_path / "cih.json", chosen=None)
    at = make_app(tiny_index, monkeypatch, tmp_path / "cih.json", page="CIH")
    assert any("fails its positive control" in e.value for e in at.error)


def test_cih_page_refuses_an_old_report(tiny_index, monkeypatch, tmp_path):
    (tmp_path / "cih.json").write_text(json.dumps({"findings": [], "answers": {"summary": {}}}))
    at = make_app(tiny_index, monkeypatch, tmp_path / "cih.json", page="CIH")
    assert [e.value for e in at.error] == [
        f"Cannot read the CIH report: {tmp_path / 'cih.json'} is not a CIH report of schema 3 (found None); "
        "re-run `fra report cih`"
    ]

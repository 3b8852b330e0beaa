"""The CIH report writer: cih.json's flat "findings" records (the explorer's contract), the
markdown headline, and the figures, from hand-made seed results."""

from __future__ import annotations

import json
from types import SimpleNamespace

from fra.ingest.studies.cih.analysis import aggregate, answers
from fra.ingest.studies.cih.config import CIHConfig
from fra.ingest.studies.cih.prompts import Lexicon
from fra.ingest.studies.cih.report import write_report
from tests.test_cih_analysis import head, seed_result, unit

FINDING_KEYS = {
    "relation",
    "layer",
    "feat_q",
    "feat_k",
    "heads",
    "kind",
    "share",
    "q_value",
    "pass_rate",
    "attn_drop",
    "attn_drop_random",
    "attn_drop_error",
    "headline",
}


def test_report_writes_flat_findings_and_a_headline(tmp_path):
    seeds = [seed_result(s, [unit(17, 3, q=0.001 if s < 4 else 0.2)], [head(17, 3)]) for s in range(5)]
    kinds = {"synonym": "conceptual"}
    fs = aggregate(seeds, kinds, 4, {(17, 10): "big", (17, 20): "dog"})
    ans = answers(seeds, fs, ["17.3"], ["synonym"], kinds, 4, 0.05)
    sae_cfg = SimpleNamespace(metadata=SimpleNamespace(hook_name="blocks.17.ln1.hook_normalized"), d_sae=4096, k=32)
    setup = SimpleNamespace(
        lm=SimpleNamespace(name="tiny"),
        saes={17: SimpleNamespace(cfg=sae_cfg)},
        model=SimpleNamespace(cfg=SimpleNamespace(n_layers=2, n_heads=9, n_key_value_heads=3, d_head=64)),
    )
    lex = Lexicon({"synonym": []}, {"noun": {}, "adj": {}}, kinds, {"p_min": 0.05})
    census = {"token_induction_heads": ["17.3"], "config": {"tih_min": 0.3, "tih_control_max": 0.05}}
    cfg = CIHConfig(layers=(17,), out=tmp_path, relations=("synonym",))
    write_report(tmp_path, cfg, cfg, setup, census, lex, ["synonym"], {}, seeds, fs, ans, 12.0)
    doc = json.loads((tmp_path / "cih.json").read_text())
    (rec,) = doc["findings"]
    assert FINDING_KEYS <= set(rec)
    assert all(not isinstance(v, (dict, list)) for v in rec.values())  # flat records
    assert (rec["relation"], rec["layer"], rec["feat_q"], rec["feat_k"], rec["heads"], rec["kind"]) == (
        "synonym",
        17,
        10,
        20,
        "17.3",
        "matching",
    )
    assert rec["pass_rate"] == 0.8 and rec["label_q"] == "big"
    md = (tmp_path / "report.md").read_text()
    assert "# Conceptual induction heads in tiny" in md
    assert "**synonym** (conceptual): H1 **yes**" in md
    for png in ("heads.png", "causal.png", "placebo.png"):
        assert (tmp_path / png).stat().st_size > 1000

"""`fra export --format neuronpedia-qk` on a tiny QK-norm model: the JSON has Neuronpedia's
qk_tracing_results shape, and its contributors (error, b_dec and bias nodes included) sum to the
model's own score."""

from __future__ import annotations

import json

import pytest
import torch

from fra.ingest.core.decompose import run_hooks
from fra.ingest.tools.testing import make_model, make_sae

PROMPT_IDS = [0, 7, 3, 9, 4, 7, 3, 9, 4, 7, 3]


class Tok:
    """Characters a..z as token ids 1..26, so the CLI runs without a real tokenizer."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - 96 for c in text]}

    def decode(self, ids):
        return "".join("<bos>" if i == 0 else chr(i + 96) for i in ids)


@pytest.fixture
def tiny_cli(monkeypatch):
    from fra.ingest import registry

    model = make_model("gemma3", seed=3)
    monkeypatch.setattr(registry, "load_model", lambda name, device="cpu": registry.LoadedModel(name, model, Tok(), 0))

    def load(self, layer, device="cpu"):
        return make_sae(16, f"blocks.{layer}.ln1.hook_normalized", d_sae=24, k=4, seed=5), "tiny-sae"

    monkeypatch.setattr(registry.SAESource, "load", load)
    return model


def run_cli(tmp_path, *extra):
    from fra.cli import main

    out = tmp_path / "graph.json"
    prompt = "".join(chr(i + 96) for i in PROMPT_IDS[1:])
    main(  # --debug: errors are raised (not reported as one line), so the test sees them
        [
            "--debug",
            "export",
            "--format",
            "neuronpedia-qk",
            "--model",
            "tiny",
            "--sae",
            str(tmp_path),
            "--prompt",
            prompt,
        ]
        + ["--out", str(out), *extra]
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("layer", [0, 2])  # a sliding-window layer (W = 5) and a global one
def test_contributors_sum_to_the_models_score(tiny_cli, tmp_path, layer):
    doc = run_cli(tmp_path, "--layer", str(layer), "--top-heads", "2")
    scores = run_hooks(tiny_cli, layer, f"blocks.{layer}.ln1.hook_normalized", torch.tensor([PROMPT_IDS]))
    targets = doc["metadata"]["info"]["fra_qk_targets"]
    assert len(targets) == 2 and len({t["head"] for t in targets}) == 2
    nodes = {n["node_id"]: n for n in doc["nodes"]}
    assert len(nodes) == len(doc["nodes"])
    q = len(PROMPT_IDS) - 1
    for t in targets:
        score = scores.model_scores_BHQK[0, t["head"], t["q"], t["k"]].item()
        row = scores.model_scores_BHQK[0, t["head"], q]
        assert t["q"] == q and t["k"] == int(row.argmax()) and q - t["k"] < (5 if layer == 0 else 99)
        qk = nodes[t["node_id"]]["qk_tracing_results"]
        assert set(qk) == {"pair_wise_contributors", "top_q_marginal_contributors", "top_k_marginal_contributors"}
        pairs = qk["pair_wise_contributors"]
        assert all(len(p) == 3 and p[0] in nodes and p[1] in nodes for p in pairs)
        # fp32 vectors, products summed in fp64, against the model's fp32 score of O(1)
        assert sum(v for *_, v in pairs) == pytest.approx(score, abs=2e-5)
        for side, col in (("top_q_marginal_contributors", 0), ("top_k_marginal_contributors", 1)):
            marg = dict(map(tuple, qk[side]))
            assert sum(marg.values()) == pytest.approx(score, abs=2e-5)
            for node_id, v in marg.items():  # a marginal is its node's row or column of the pairs
                assert v == pytest.approx(sum(p[2] for p in pairs if p[col] == node_id), abs=1e-9)
        # the error, b_dec and bias terms are nodes of their own on both sides, never dropped
        for pos_side, pos in ((0, t["q"]), (1, t["k"])):
            ids = {p[pos_side] for p in pairs}
            for kind in ("error_sae", "bdec_sae", "bias_attn"):
                assert f"{layer}_{kind}_{pos}" in ids
        errors = [v for a, b, v in pairs if "error" in a or "error" in b]
        assert max(abs(v) for v in errors) > 0
        assert [abs(p[2]) for p in pairs] == sorted((abs(p[2]) for p in pairs), reverse=True)
        assert all(
            n["feature_type"] == "sae" and n["activation"] != 0
            for n in nodes.values()
            if "_sae_" in n["node_id"] and "error" not in n["node_id"] and "bdec" not in n["node_id"]
        )


def test_bad_positions_and_heads_are_refused(tiny_cli, tmp_path):
    with pytest.raises(ValueError, match="--k-pos 1 is not a key that query 10 can see at layer 0"):
        run_cli(tmp_path, "--layer", "0", "--head", "1", "--k-pos", "1")  # 9 back, window 5
    with pytest.raises(ValueError, match="--head 7 out of range"):
        run_cli(tmp_path, "--layer", "2", "--head", "7")
    doc = run_cli(tmp_path, "--layer", "0", "--head", "1", "--k-pos", "8")
    assert [(t["head"], t["k"]) for t in doc["metadata"]["info"]["fra_qk_targets"]] == [(1, 8)]

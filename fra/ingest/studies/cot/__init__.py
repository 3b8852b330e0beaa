"""Chains of thought, feature-resolved: Thought Anchors' receiver heads and attention suppression
at sentence level (`anchors.py`), resolved into SAE feature-pair channels (`resolve.py`).

`fra cot` makes traces (`traces.py`, `make_traces`); `fra report cot` runs the study (`study.py`)
and writes reports/cot/ (`report.py`).
"""

from __future__ import annotations

from .config import CotConfig, CotReportConfig


def make_traces(cfg: CotConfig):
    """Generate (or read) traces and write them as JSONL; returns them."""
    import torch

    from . import traces as tr

    torch.set_num_threads(cfg.threads)
    tok = None
    if cfg.from_jsonl is None or cfg.model:
        hf_model, tok = _hf_model(cfg.model, need_weights=cfg.from_jsonl is None)
    if cfg.from_jsonl is not None:
        out = tr.read_jsonl(cfg.from_jsonl, tok)
    else:
        out = tr.generate(hf_model, tok, cfg.tasks, cfg.n_per_task, cfg.seed, cfg.max_new_tokens, cfg.batch_size)
    tr.write_jsonl(out, cfg.out)
    return out


def _hf_model(name: str, need_weights: bool):
    """A transformers causal LM and its tokenizer: the offline preset, or any hub name."""
    from fra.ingest.registry import ModelUnavailableError, smollm2_hf

    if name == "smollm2-135m":
        return smollm2_hf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name).eval() if need_weights else None
    except OSError as exc:
        raise ModelUnavailableError(
            f"cannot load {name!r} from the Hugging Face hub (offline, or not a causal LM there): {exc}"
        ) from exc
    return model, tok


def run_report(cfg: CotReportConfig) -> dict:
    from .study import run

    return run(cfg)


__all__ = ["CotConfig", "CotReportConfig", "make_traces", "run_report"]

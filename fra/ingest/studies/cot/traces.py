"""Chains of thought to study: generated on-policy from reasoning-gym problems, or read from JSONL.

A trace is the model's answer text after a chat-formatted problem. Generated traces are scored by
reasoning-gym's own `score_answer` on the answer extracted from the trace (`extract_answer`).
JSONL input holds one object per line with the keys "problem", "trace" and "answer" (the expected
answer); "correct" (bool) is optional and, when absent, the trace counts as correct if its extracted
answer equals "answer" as text.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

INSTRUCTION = "Think step by step, one short sentence per step, then write 'Answer:' and the number."

# easy settings so that a 135M model gets some right; gsm_symbolic is used as shipped
TASKS = {
    "basic_arithmetic": dict(
        min_terms=2, max_terms=2, min_digits=1, max_digits=1, operators=("+", "-"), allow_negation=False
    ),
    "chain_sum": dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2),
    "gsm_symbolic": {},
}

_NUMBER = r"-?\d[\d,]*(?:\.\d+)?"


@dataclass(frozen=True)
class Trace:
    problem: str
    trace: str
    answer: str  # the expected answer
    prompt: str  # the chat-formatted text the trace continues
    predicted: str | None  # the answer extracted from the trace
    correct: bool
    task: str  # reasoning-gym dataset name, or "jsonl"
    n_new_tokens: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


class TraceInputError(ValueError):
    """A traces file that cannot be used; the message says why."""


def extract_answer(trace: str) -> str | None:
    """The number after the last 'Answer:' (or 'the answer is'), else the last number in the trace."""
    for pat in (rf"answer\s*:\s*\**\s*\$?({_NUMBER})", rf"answer is\s*:?\s*\**\s*\$?({_NUMBER})"):
        hits = re.findall(pat, trace, flags=re.IGNORECASE)
        if hits:
            return hits[-1].replace(",", "")
    hits = re.findall(_NUMBER, trace)
    return hits[-1].replace(",", "") if hits else None


def chat_prompt(tokenizer, problem: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": f"{problem}\n{INSTRUCTION}"}], tokenize=False, add_generation_prompt=True
    )


def problems(tasks: tuple[str, ...], n_per_task: int, seed: int) -> list[tuple]:
    """(task, dataset, entry) triples: the dataset scores its own entries."""
    import reasoning_gym as rg

    out = []
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        ds = rg.create_dataset(task, size=n_per_task, seed=seed, **TASKS[task])
        out += [(task, ds, e) for e in ds]
    return out


def generate(
    hf_model, tokenizer, tasks: tuple[str, ...], n_per_task: int, seed: int, max_new_tokens: int, batch_size: int = 8
) -> list[Trace]:
    """Greedy traces of a transformers causal LM, scored by reasoning-gym."""
    import torch
    from tqdm import tqdm

    items = problems(tasks, n_per_task, seed)
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    traces = []
    for start in tqdm(range(0, len(items), batch_size), desc="generating traces", unit="batch"):
        batch = items[start : start + batch_size]
        prompts = [chat_prompt(tokenizer, e["question"]) for _, _, e in batch]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            out = hf_model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        new = out[:, enc["input_ids"].shape[1] :]
        for (task, ds, entry), prompt, ids in zip(batch, prompts, new):
            ids = ids[ids != pad] if pad != tokenizer.eos_token_id else ids[: _until_eos(ids, tokenizer.eos_token_id)]
            text = tokenizer.decode(ids, skip_special_tokens=True).strip()
            pred = extract_answer(text)
            score = ds.score_answer(answer=pred, entry=entry) if pred is not None else 0.0
            traces.append(
                Trace(entry["question"], text, str(entry["answer"]), prompt, pred, bool(score >= 1.0), task, len(ids))
            )
    return traces


def _until_eos(ids, eos: int) -> int:
    hits = (ids == eos).nonzero()
    return int(hits[0]) if len(hits) else len(ids)


def read_jsonl(path: Path, tokenizer) -> list[Trace]:
    """Traces from a JSONL file of {"problem", "trace", "answer"} (+ optional "correct", "prompt")."""
    path = Path(path)
    if not path.exists():
        raise TraceInputError(f"no traces file at {path}")
    traces = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceInputError(f"{path}:{i} is not JSON ({exc})") from exc
        missing = [k for k in ("problem", "trace", "answer") if not isinstance(obj.get(k), str) or not obj.get(k)]
        if missing:
            raise TraceInputError(f"{path}:{i} lacks the non-empty text field(s) {', '.join(missing)}")
        pred = obj.get("predicted", extract_answer(obj["trace"]))
        correct = obj.get("correct")
        if correct is None:
            correct = pred is not None and pred.strip() == obj["answer"].strip()
        traces.append(
            Trace(
                obj["problem"],
                obj["trace"],
                obj["answer"],
                obj.get("prompt") or chat_prompt(tokenizer, obj["problem"]),
                pred,
                bool(correct),
                obj.get("task", "jsonl"),
                int(obj.get("n_new_tokens", -1)),
            )
        )
    if not traces:
        raise TraceInputError(f"{path} holds no traces")
    return traces


def write_jsonl(traces: list[Trace], path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(t.to_json() + "\n" for t in traces))
    tmp.replace(path)

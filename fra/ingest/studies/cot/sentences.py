"""Sentences of a trace and their exact token spans.

Every line break ends a sentence, and pysbd splits each line into sentences with character spans
(Thought Anchors splits at '.', '?', '!' and blank lines). The spans are made contiguous, the
whitespace between two sentences opening the later one (byte-level BPE tokens carry their leading
space), and the chat prompt + trace is tokenised once with offsets; a token belongs to the sentence
in which its first character lies. The token spans therefore partition the trace's tokens, and the
tokens of sentence i decode to sentence i's text wherever no token straddles a sentence boundary
(tests/test_cot.py checks the round trip on every shipped trace).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segmented:
    """One trace as tokens and sentences. Token spans are [start, end) positions in `tokens`."""

    tokens: list[int]
    prompt_len: int  # tokens before the trace (the chat prompt)
    sentences: list[str]
    char_spans: list[tuple[int, int]]  # in the trace text
    token_spans: list[tuple[int, int]]

    @property
    def n(self) -> int:
        return len(self.sentences)


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Contiguous character spans covering `text`: every line break ends a sentence (the default
    model writes one step per line, often without a full stop), and pysbd splits each line."""
    import re

    import pysbd

    if not text.strip():
        return []
    seg = pysbd.Segmenter(language="en", clean=False, char_span=True)
    starts = set()
    for line in re.finditer(r"[^\n]+", text):
        for s in seg.segment(line.group()):
            if s.sent.strip():
                starts.add(line.start() + s.start)
    starts = sorted(starts)
    # whitespace between sentences opens the next one: byte-level BPE tokens carry leading spaces
    for k in range(1, len(starts)):
        while starts[k] > starts[k - 1] + 1 and text[starts[k] - 1].isspace():
            starts[k] -= 1
    starts[0] = 0
    ends = starts[1:] + [len(text)]
    return list(zip(starts, ends))


def segment(tokenizer, prompt: str, trace: str, max_tokens: int | None = None) -> Segmented:
    """Tokenise prompt + trace with offsets and map the trace's sentences onto tokens.

    With `max_tokens`, sentences that end past that many tokens are dropped (the trace is cut at a
    sentence boundary).
    """
    char_spans = split_sentences(trace)
    enc = tokenizer(prompt + trace, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    first_char = np.array([s for s, _ in offsets])
    base = len(prompt)
    prompt_len = int((first_char < base).sum())
    if not np.all(np.diff(first_char) >= 0):
        raise ValueError("token offsets are not monotone; cannot map sentences onto tokens")
    # a token belongs to the sentence holding its first character
    starts = [int(np.searchsorted(first_char, base + cs, side="left")) for cs, _ in char_spans]
    ends = starts[1:] + [len(ids)]
    keep: list[tuple[int, int, tuple[int, int]]] = []
    for s, e, cs in zip(starts, ends, char_spans):
        if e > s:
            keep.append((s, e, cs))
        elif keep:  # its first token started in the previous sentence: merge the text there
            ps, pe, (pa, _) = keep[-1]
            keep[-1] = (ps, pe, (pa, cs[1]))
    if not keep or keep[0][0] != prompt_len:
        raise ValueError("the trace's first token starts inside the prompt; cannot split it into sentences")
    if max_tokens is not None:
        keep = [x for x in keep if x[1] <= max_tokens]
    sentences = [trace[a:b] for _, _, (a, b) in keep]
    n_tok = keep[-1][1] if keep else prompt_len
    return Segmented(ids[:n_tok], prompt_len, sentences, [cs for _, _, cs in keep], [(s, e) for s, e, _ in keep])


def shuffled_spans(spans: list[tuple[int, int]], rng: np.random.Generator) -> list[tuple[int, int]]:
    """The null: the same tokens and the same sentence lengths in a random order, so only the
    boundaries move."""
    lengths = np.array([e - s for s, e in spans])
    order = rng.permutation(len(lengths))
    start = spans[0][0]
    cuts = start + np.concatenate([[0], np.cumsum(lengths[order])])
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]

"""Prompts of the CIH study: conceptual repeats and their matched controls.

A pair (A, B) of a relation fills a template such as

    "I saw the {A} {X} near the old {N}. Much later that evening, I kept thinking about the {B}"

The query is B (the last token), the induction target is X (the token after A), and N are other
nouns of the prompt. The control replaces A by a word U of the same part of speech and corpus
frequency (wordfreq Zipf, nearest available) that is unrelated to A and B; B, X, N and every
position stay the same, so the contrast "conceptual minus control" isolates what A's relation to
B adds. Pairs and templates are both split per seed: selection prompts use selection pairs with
selection templates, test prompts use the other pairs with the other (test-only) templates.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets"

# Varied syntax: narrative, dialogue, lists, questions, conditionals, quotes, notes. Every word
# slot is preceded by a space; {B} is always last; {A} {X} are adjacent.
TEMPLATES = (
    "I saw the {A} {X} near the old {N}. Much later that evening, I kept thinking about the {B}",
    "She bought a {A} {X} at the {N} on Monday. By the time winter came, she had forgotten the {B}",
    "The report mentioned one {A} {X} in its first section and a {N} in the second; at the very end "
    "it described the {B}",
    "Yesterday my uncle found a {A} {X} behind the {N}. Today he asked me about the {B}",
    "In the story, a {A} {X} sits beside a {N}. At the end of the chapter, the hero returns to the {B}",
    "Q: Where did you leave the {A} {X}? A: Next to the {N}. Q: And where is the {B}",
    "Notes: {A} {X}, {N}, paper, ink. Reminder: bring the {B}",
    "The museum keeps a {A} {X} in a glass case, next to a {N}. Visitors always ask about the {B}",
    "He wrote that the {A} {X} was broken. Then he fixed the {N} and looked at the {B}",
    "Our teacher drew a {A} {X} on the board and a {N} below it. After lunch, she pointed at the {B}",
    "Item one: the {A} {X}. Item two: the {N}. Item three: the {B}",
    "If the {A} {X} falls, the {N} will break. Nobody wants to lose the {B}",
    "They painted the {A} {X} blue, while the {N} stayed white. Years later, we repainted the {B}",
    "Every morning the farmer feeds the {A} {X} and cleans the {N}. In the evening he watches the {B}",
    "A {A} {X} appeared in my dream, followed by a {N}. When I woke up, I searched for the {B}",
    "Look at this {A} {X}! It is bigger than any {N} I know. Please hand me the {B}",
    "During the meeting the {A} {X} was mentioned twice and the {N} once. The chair then summarised the {B}",
    "My grandmother never sold her {A} {X}, though she sold the {N}. She still talks about her {B}",
    "The sign said: {A} {X} for sale. Below it someone had drawn a {N} and the {B}",
    "Why is there a {A} {X} in the kitchen, I asked, moving the {N}. Then I noticed the {B}",
    "Once upon a time, a {A} {X} lived near a {N}. One day, a child met the {B}",
    "The list of prizes included a {A} {X}, a {N}, and, best of all, the {B}",
    "We talked about the {A} {X} for hours and ignored the {N}. On the way home I dreamed of the {B}",
    "According to the manual, the {A} {X} must be cleaned before the {N} is used. Always check the {B}",
)
SLOTS = ("{A}", "{X}", "{N}", "{B}")


@dataclass(frozen=True)
class WordPair:
    A: str
    B: str
    pos: str  # part of speech of A: "noun" or "adj"
    relation: str


@dataclass(frozen=True)
class Prompt:
    """One tokenised prompt. Positions index `tokens`; the query is the last position."""

    tokens: tuple[int, ...]
    a_pos: int
    x_pos: int
    n_pos: tuple[int, ...]
    relation: str
    role: str  # "concept" or "control"
    pair_id: int  # a concept prompt and its control share pair_id (and every position)
    half: int  # 0 = selection, 1 = test
    template: int
    words: tuple[str, str, str, str]  # A (or U for a control), X, N, B

    @property
    def q_pos(self) -> int:
        return len(self.tokens) - 1


@dataclass(frozen=True)
class Lexicon:
    relations: dict  # relation -> list of WordPair
    zipf: dict  # pos -> {word: Zipf frequency}
    kinds: dict  # relation -> "conceptual" / "orthographic" / "positive control" / "placebo"
    validation: dict


def load_lexicon(path: Path = ASSETS / "concept_pairs.json") -> Lexicon:
    raw = json.loads(Path(path).read_text())
    rels = {r: [WordPair(p["A"], p["B"], p["pos"], r) for p in ps] for r, ps in raw["relations"].items()}
    return Lexicon(rels, raw["zipf"], raw["kinds"], raw["validation"])


def unrelated(w: str, others) -> bool:
    """No shared 4-letter stem and no containment with any of `others` (case-insensitive)."""
    w = w.lower()
    return all(w[:4] != o.lower()[:4] and w not in o.lower() and o.lower() not in w for o in others)


def frequency_matched(word: str, pos: str, zipf: dict, exclude, rng: random.Random, width: float = 0.25) -> str:
    """A random word of part of speech `pos` whose Zipf frequency lies within `width` of `word`'s
    (widened until one exists), unrelated to every word in `exclude`."""
    pool = zipf[pos]
    z = pool.get(word, zipf["noun"].get(word, zipf["adj"].get(word, 3.5)))
    cands = []
    while not cands:
        cands = sorted(w for w, zw in pool.items() if abs(zw - z) <= width and unrelated(w, exclude))
        width *= 2
    return rng.choice(cands)


def placebo_pairs(lex: Lexicon, rng: random.Random) -> list[WordPair]:
    """B of each synonym pair, paired with a frequency-matched noun unrelated to A and B."""
    out = []
    for p in lex.relations.get("synonym", []):
        a = frequency_matched(p.A, p.pos, lex.zipf, (p.A, p.B), rng)
        out.append(WordPair(a, p.B, p.pos, "placebo"))
    return out


def split_templates(n_templates: int, rng: random.Random) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Half the templates for selection, the other half only for testing."""
    idx = list(range(n_templates))
    rng.shuffle(idx)
    h = n_templates // 2
    return tuple(sorted(idx[:h])), tuple(sorted(idx[h:]))


class TokenisationError(ValueError):
    """A prompt does not tokenise as the concatenation of its parts."""


def tokenise(template: str, words: dict, encode, bos: int) -> tuple[list[int], dict]:
    """Token ids of a filled template and the position of each slot word.

    Each slot word must be one token with its leading space, and the ids of the whole string must
    equal the concatenation of the parts' ids (no merge across a boundary); otherwise raise."""
    ids, pos, rest = [bos], {}, template
    while rest:
        cut = min(((rest.find(s), s) for s in SLOTS if s in rest), default=(len(rest), None))
        head, slot = rest[: cut[0]], cut[1]
        assert slot is None or head.endswith(" "), f"slot {slot} must follow a space"
        if slot is None:
            ids += encode(head)
            break
        ids += encode(head[:-1])
        wid = encode(" " + words[slot])
        if len(wid) != 1:
            raise TokenisationError(f"{words[slot]!r} is not a single token")
        pos.setdefault(slot, []).append(len(ids))
        ids += wid
        rest = rest[cut[0] + len(slot) :]
    text = template
    for s in SLOTS:
        text = text.replace(s, words[s])
    if [bos] + encode(text) != ids:
        raise TokenisationError(f"{text!r} does not tokenise as the concatenation of its parts")
    return ids, pos


def concept_prompts(
    pairs: list[WordPair],
    templates: tuple[int, ...],
    half: int,
    lex: Lexicon,
    encode,
    bos: int,
    rng: random.Random,
    first_id: int = 0,
) -> list[Prompt]:
    """For each pair, a conceptual prompt (A ... B) and its control (U ... B) with the same X, N, B
    and template; templates rotate through `templates`. Pairs that do not tokenise cleanly are
    skipped (both prompts)."""
    nouns = sorted(lex.zipf["noun"])
    out = []
    for i, p in enumerate(pairs):
        x = rng.choice([w for w in nouns if unrelated(w, (p.A, p.B))])
        n = rng.choice([w for w in nouns if unrelated(w, (p.A, p.B, x))])
        u = frequency_matched(p.A, p.pos, lex.zipf, (p.A, p.B, x, n), rng)
        t = templates[i % len(templates)]
        pair = []
        try:
            for role, a in (("concept", p.A), ("control", u)):
                ids, pos = tokenise(TEMPLATES[t], {"{A}": a, "{X}": x, "{N}": n, "{B}": p.B}, encode, bos)
                pair.append(
                    Prompt(
                        tuple(ids),
                        pos["{A}"][0],
                        pos["{X}"][0],
                        tuple(pos["{N}"]),
                        p.relation,
                        role,
                        first_id + i,
                        half,
                        t,
                        (a, x, n, p.B),
                    )
                )
        except TokenisationError:
            continue
        assert pair[0].x_pos == pair[0].a_pos + 1 and len(pair[0].tokens) == len(pair[1].tokens)
        out += pair
    return out


def study_prompts(relation: str, lex: Lexicon, n_pairs: int, encode, bos: int, seed: int) -> list[Prompt]:
    """All prompts of one relation for one seed: pairs shuffled and split in halves, templates
    split in halves, half 0 = selection, half 1 = test."""
    rng = random.Random(f"{seed}:{relation}")
    pairs = placebo_pairs(lex, rng) if relation == "placebo" else list(lex.relations[relation])
    rng.shuffle(pairs)
    pairs = pairs[:n_pairs]
    sel_t, test_t = split_templates(len(TEMPLATES), random.Random(seed))
    h = len(pairs) // 2
    return concept_prompts(pairs[:h], sel_t, 0, lex, encode, bos, rng) + concept_prompts(
        pairs[h:], test_t, 1, lex, encode, bos, rng, first_id=h
    )

"""Prompts of the CIH study: conceptual repeats and their matched controls.

A pair (A, B) of a relation fills a template such as

    "I saw the {A} {X} near the old {N}. Much later that evening, I kept thinking about the {B}"

The query is B (the last token), the induction target is X (the token after A), and N are other
nouns of the prompt. The control replaces A by a random word U of the same part of speech whose
corpus frequency (wordfreq Zipf) lies within 0.25 of A's (the band widens until one exists),
unrelated to A and B; B, X, N and every position stay the same, so "conceptual minus control"
isolates what A's relation to B adds. The anchor swap puts A in the N slot and U before X: B's
relative is present but not before X, so induction predicts no extra attention on X.

Templates come in two families: 24 where X is a random noun after A, and 8 where X is the
template's own punctuation or function word (a key feature that marks "a word after a noun" cannot
carry these). Per seed each family is split into selection and held-out templates; every pair is
measured on both, so a channel can be selected within one pair and tested on held-out templates.
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
# X does not follow a noun here (it is punctuation or a function word, fixed by the template), so a
# key feature that fires on "a word right after a noun" cannot carry the induction: the template's
# own token after A is X.
FUNCTION_TEMPLATES = (
    "I saw the {A}, and later a {N} near the house. Much later that evening, I kept thinking about the {B}",
    "She said the {A} was gone, and the {N} too. By the time winter came, she had forgotten the {B}",
    "We found the {A} and a {N} in the attic. The next day we sold the {B}",
    "There was a {A}. Then a {N} arrived. At last came the {B}",
    "He put the {A} on the shelf and the {N} in the box. Later he took down the {B}",
    "The {A} is old; the {N} is new. Everyone prefers the {B}",
    "My friend likes the {A} because the {N} is too loud. I told her about the {B}",
    "Near the {A} stood a {N}. Somebody had moved the {B}",
)
ALL_TEMPLATES = TEMPLATES + FUNCTION_TEMPLATES
SLOTS = ("{A}", "{X}", "{N}", "{B}")


def x_kind(template: int) -> str:
    """'noun': X is a random noun after A; 'function': X is the template's own token after A."""
    return "noun" if template < len(TEMPLATES) else "function"


@dataclass(frozen=True)
class WordPair:
    A: str
    B: str
    pos: str  # part of speech of A: "noun" or "adj"
    relation: str


@dataclass(frozen=True)
class Prompt:
    """One tokenised prompt. Positions index `tokens`; the query is the last position.

    A pair's prompts on one template share every position: the conceptual prompt (A ... B), its
    control (U ... B, A replaced by an unrelated word) and, on held-out templates, the anchor swap
    (U ... A-in-the-N-slot ... B: B's relative sits elsewhere, not before X)."""

    tokens: tuple[int, ...]
    a_pos: int
    x_pos: int
    n_pos: tuple[int, ...]
    relation: str
    role: str  # "concept", "control" or "swap"
    pair_id: int
    half: int  # 0 = selection template, 1 = held-out template
    template: int  # index into ALL_TEMPLATES
    words: tuple[str, str, str, str]  # the words in the A, X, N and B slots
    pair_set: int = 0  # 0 = selection pair, 1 = test pair (word-disjoint halves, see split_pairs)

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


def read_pairs(path: Path) -> list[WordPair]:
    """A JSON list of {"A", "B", "relation"} (optional "pos", default "noun"); raises on bad input."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--pairs {path}: cannot read a JSON list of pairs ({exc})") from exc
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"--pairs {path}: expected a non-empty JSON list of {{'A', 'B', 'relation'}} objects")
    out = []
    for n, p in enumerate(raw):
        if not isinstance(p, dict) or not all(isinstance(p.get(k), str) and p.get(k) for k in ("A", "B", "relation")):
            raise ValueError(f"--pairs {path}: item {n} is not an object with string fields A, B and relation: {p!r}")
        if p["relation"] == "placebo":
            raise ValueError(f"--pairs {path}: item {n}: 'placebo' is built by the study itself; rename the relation")
        out.append(WordPair(p["A"], p["B"], p.get("pos", "noun"), p["relation"]))
    return out


def unrelated(w: str, others) -> bool:
    """No shared 4-letter stem and no containment with any of `others` (case-insensitive)."""
    w = w.lower()
    return all(w[:4] != o.lower()[:4] and w not in o.lower() and o.lower() not in w for o in others)


def morphological(a: str, b: str) -> bool:
    """True when a and b may be forms of one word (case-insensitive): a shared 3-letter prefix,
    containment, a shared run of 4 letters, or a shared 2-letter prefix with a difflib similarity
    >= 0.4 (fire/firing, vote/voting, hate/hatred, shot/shooting, alone/lonely, thought/thinking,
    gray/grey). Conservative: it also drops a few true synonyms (house/home)."""
    import difflib

    a, b = a.lower(), b.lower()
    m = difflib.SequenceMatcher(None, a, b)
    longest = m.find_longest_match(0, len(a), 0, len(b)).size
    return a[:3] == b[:3] or a in b or b in a or longest >= 4 or (a[:2] == b[:2] and m.ratio() >= 0.4)


def split_pairs(pairs: list[WordPair], rng: random.Random) -> tuple[list[WordPair], list[WordPair]]:
    """Two halves with no word in common: pairs that share a word (case-insensitive, either side)
    are connected, and whole connected groups go to one half (smaller groups fill the smaller half)."""
    parent = {}

    def find(w):
        parent.setdefault(w, w)
        while parent[w] != w:
            parent[w] = parent[parent[w]]
            w = parent[w]
        return w

    for p in pairs:
        parent[find(p.A.lower())] = find(p.B.lower())
    groups = {}
    for p in pairs:
        groups.setdefault(find(p.A.lower()), []).append(p)
    comps = list(groups.values())
    rng.shuffle(comps)
    comps.sort(key=len, reverse=True)
    halves = ([], [])
    for c in comps:
        halves[len(halves[0]) > len(halves[1])].extend(c)
    return halves


def frequency_matched(word: str, pos: str, zipf: dict, exclude, rng: random.Random, width: float = 0.25) -> str:
    """A random word of part of speech `pos` whose Zipf frequency lies within `width` of `word`'s
    (the band doubles until it holds a word), unrelated to every word in `exclude`."""
    pool = zipf[pos] if pos in zipf else zipf["noun"]
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


def template_halves(seed: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Selection and held-out templates (indices into ALL_TEMPLATES): each family split in halves."""
    rng = random.Random(seed)
    s1, t1 = split_templates(len(TEMPLATES), rng)
    s2, t2 = split_templates(len(FUNCTION_TEMPLATES), rng)
    off = len(TEMPLATES)
    return s1 + tuple(off + i for i in s2), t1 + tuple(off + i for i in t2)


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


def pair_prompts(
    p: WordPair,
    pair_id: int,
    pair_set: int,
    templates: tuple[int, ...],
    half: int,
    lex: Lexicon,
    encode,
    bos: int,
    rng: random.Random,
) -> list[Prompt]:
    """A pair's prompts on each template: concept and control, plus the anchor swap on held-out
    templates (half 1). X (noun templates), N and the control word U are drawn afresh per template.
    A template on which any of them does not tokenise cleanly is skipped."""
    nouns = sorted(lex.zipf["noun"])
    out = []
    for t in templates:
        x = rng.choice([w for w in nouns if unrelated(w, (p.A, p.B))])
        n = rng.choice([w for w in nouns if unrelated(w, (p.A, p.B, x))])
        u = frequency_matched(p.A, p.pos, lex.zipf, (p.A, p.B, x, n), rng)
        roles = [("concept", p.A, n), ("control", u, n)] + ([("swap", u, p.A)] if half == 1 else [])
        made = []
        try:
            for role, a, nn in roles:
                ids, pos = tokenise(ALL_TEMPLATES[t], {"{A}": a, "{X}": x, "{N}": nn, "{B}": p.B}, encode, bos)
                a_pos = pos["{A}"][0]
                x_word = x if "{X}" in pos else "<template>"
                made.append(
                    Prompt(
                        tuple(ids), a_pos, a_pos + 1, tuple(pos["{N}"]), p.relation, role, pair_id, half, t,
                        (a, x_word, nn, p.B), pair_set,
                    )
                )  # fmt: skip
        except TokenisationError:
            continue
        if len({len(m.tokens) for m in made}) != 1:
            continue
        out += made
    return out


def study_prompts(
    relation: str, pairs: list[WordPair], lex: Lexicon, n_pairs: int, n_templates: int, encode, bos: int, seed: int
) -> list[Prompt]:
    """All prompts of one relation for one seed. Pairs: a seeded sample of n_pairs, split into
    word-disjoint selection and test pairs (for units fixed across pairs). Templates: every pair
    gets the same n_templates selection templates and n_templates held-out ones, drawn per seed (a
    quarter of each from the function-X family)."""
    rng = random.Random(f"{seed}:{relation}")
    pairs = list(pairs)
    rng.shuffle(pairs)
    sel_p, test_p = split_pairs(pairs[:n_pairs], rng)
    sel_t, test_t = template_halves(seed)
    n_fn = max(1, round(n_templates / 4))

    def draw(ts):
        noun = [t for t in ts if x_kind(t) == "noun"]
        fn = [t for t in ts if x_kind(t) == "function"]
        return tuple(rng.sample(noun, min(len(noun), n_templates - n_fn)) + rng.sample(fn, min(len(fn), n_fn)))

    # one template draw per seed for every pair: prompts of a template share a length, so they batch
    chosen = ((0, draw(sel_t)), (1, draw(test_t)))
    out = []
    for pair_set, ps in enumerate((sel_p, test_p)):
        for p in ps:
            pid = hash_pair(p)
            for half, ts in chosen:
                out += pair_prompts(p, pid, pair_set, ts, half, lex, encode, bos, rng)
    return out


def hash_pair(p: WordPair) -> int:
    """A stable id of a pair (31 bits), the same in every seed."""
    import zlib

    return zlib.crc32(f"{p.relation}|{p.A}|{p.B}".encode()) & 0x7FFFFFFF

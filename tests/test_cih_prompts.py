"""CIH prompts: tokenisation checks, the pairing of each conceptual prompt with its control,
frequency matching, the placebo relation and the selection/test splits."""

from __future__ import annotations

import random
import re

import pytest

from fra.ingest.studies.cih.prompts import (
    TEMPLATES,
    Lexicon,
    TokenisationError,
    WordPair,
    concept_prompts,
    frequency_matched,
    placebo_pairs,
    study_prompts,
    tokenise,
    unrelated,
)


class WordTokenizer:
    """Word-level: ' word', single punctuation, lone spaces. `merge` lists strings that become one
    token (a merge across a word boundary, which the prompt builder must detect)."""

    def __init__(self, merge=()):
        self.vocab, self.merge = {}, tuple(merge)

    def __call__(self, s: str) -> list[int]:
        pieces = []
        for m in self.merge:
            s = s.replace(m, "\0" + m.replace(" ", "\1") + "\0")
        for part in s.split("\0"):
            if "\1" in part:
                pieces.append(part.replace("\1", " "))
            else:
                pieces += re.findall(r" ?[A-Za-z]+| ?[^A-Za-z ]| ", part)
        return [self.vocab.setdefault(p, len(self.vocab) + 1) for p in pieces]


ZIPF = {
    "noun": {
        "dog": 4.5,
        "hound": 3.4,
        "car": 4.6,
        "auto": 3.5,
        "tree": 4.4,
        "stone": 4.2,
        "house": 5.0,
        "lamp": 3.6,
        "river": 4.3,
        "cup": 4.1,
        "bell": 3.9,
        "coin": 3.8,
        "ship": 4.4,
        "boot": 3.7,
        "rope": 3.6,
        "nail": 3.6,
        "road": 4.5,
        "desk": 3.9,
    },
    "adj": {"big": 5.0, "large": 5.0, "small": 4.9, "red": 4.8, "green": 4.8, "old": 5.2, "cold": 4.6},
}
LEX = Lexicon(
    {
        "synonym": [
            WordPair("dog", "hound", "noun", "synonym"),
            WordPair("car", "auto", "noun", "synonym"),
            WordPair("big", "large", "adj", "synonym"),
            WordPair("stone", "rope", "noun", "synonym"),
        ]
    },
    ZIPF,
    {"synonym": "conceptual", "placebo": "placebo"},
    {},
)


def test_tokenise_positions_and_boundary_check():
    enc = WordTokenizer()
    ids, pos = tokenise(
        "I saw the {A} {X} near the {N}. Then the {B}",
        {"{A}": "big", "{X}": "dog", "{N}": "tree", "{B}": "large"},
        enc,
        bos=0,
    )
    # [BOS] I | saw | the | big | dog | near | the | tree | . | Then | the | large: A at 4, X at 5, N at 8, B last
    assert pos == {"{A}": [4], "{X}": [5], "{N}": [8], "{B}": [12]}
    assert len(ids) == 13 and ids[0] == 0
    assert ids[4] == enc(" big")[0] and ids[12] == enc(" large")[0]
    # a tokenizer that merges " big dog" into one token: the concatenation check must fail
    with pytest.raises(TokenisationError, match="concatenation"):
        tokenise(
            "I saw the {A} {X} near the {N}. Then the {B}",
            {"{A}": "big", "{X}": "dog", "{N}": "tree", "{B}": "large"},
            WordTokenizer(merge=[" big dog"]),
            0,
        )
    # a word that is two tokens is refused
    with pytest.raises(TokenisationError, match="single token"):
        tokenise("the {A} {X} and {N} the {B}", {"{A}": "big-dog", "{X}": "dog", "{N}": "tree", "{B}": "large"}, enc, 0)


def test_every_template_has_the_slots_in_order():
    assert len(TEMPLATES) >= 20
    for t in TEMPLATES:
        assert "{A} {X}" in t and t.endswith("{B}") and "{N}" in t
        assert t.index("{A}") < t.index("{N}") < t.index("{B}")


def test_concept_prompts_pair_each_prompt_with_its_control():
    enc = WordTokenizer()
    rng = random.Random(0)
    pairs = LEX.relations["synonym"]
    prompts = concept_prompts(pairs, (0, 5, 10), 1, LEX, enc, 0, rng, first_id=7)
    assert [p.role for p in prompts] == ["concept", "control"] * len(pairs)
    for i in range(0, len(prompts), 2):
        c, u = prompts[i], prompts[i + 1]
        pair = pairs[i // 2]
        assert c.pair_id == u.pair_id == 7 + i // 2 and c.half == u.half == 1
        assert c.template == u.template == (0, 5, 10)[(i // 2) % 3]
        # same length, same positions, same tokens everywhere except at A
        assert len(c.tokens) == len(u.tokens)
        assert (c.a_pos, c.x_pos, c.n_pos, c.q_pos) == (u.a_pos, u.x_pos, u.n_pos, u.q_pos)
        diff = [t for t in range(len(c.tokens)) if c.tokens[t] != u.tokens[t]]
        assert diff == [c.a_pos]
        assert c.x_pos == c.a_pos + 1 and c.q_pos == len(c.tokens) - 1
        assert c.tokens[c.a_pos] == enc(" " + pair.A)[0] and c.tokens[c.q_pos] == enc(" " + pair.B)[0]
        a_u, x, n, b = u.words
        assert c.words[1:] == (x, n, b) and c.words[0] == pair.A
        # the control word: same part of speech, unrelated to A, B, X, N, frequency within the band
        assert a_u in ZIPF[pair.pos] and unrelated(a_u, (pair.A, pair.B, x, n))
        assert abs(ZIPF[pair.pos][a_u] - ZIPF[pair.pos][pair.A]) <= 0.5  # the band widens 0.25 -> 0.5 at most here


def test_frequency_matched_picks_the_nearest_band():
    rng = random.Random(0)
    # dog 4.5: within 0.25 are car 4.6, tree 4.4, ship 4.4, river 4.3, road 4.5; cup 4.1 is out
    picks = {frequency_matched("dog", "noun", ZIPF, ("dog", "hound"), rng) for _ in range(200)}
    assert picks == {"car", "tree", "ship", "river", "road"}


def test_placebo_pairs_keep_b_and_replace_a_by_an_unrelated_word():
    pl = placebo_pairs(LEX, random.Random(0))
    assert [p.B for p in pl] == [p.B for p in LEX.relations["synonym"]]
    for p, s in zip(pl, LEX.relations["synonym"]):
        assert p.relation == "placebo" and p.pos == s.pos and p.A != s.A and unrelated(p.A, (s.A, s.B))


def test_study_prompts_split_pairs_and_templates():
    lex = Lexicon(
        {
            "synonym": [
                WordPair(a, b, "noun", "synonym")
                for a, b in [
                    ("dog", "hound"),
                    ("car", "auto"),
                    ("stone", "rope"),
                    ("cup", "bell"),
                    ("coin", "ship"),
                    ("boot", "nail"),
                    ("road", "desk"),
                    ("lamp", "river"),
                ]
            ]
        },
        ZIPF,
        {},
        {},
    )
    ps = study_prompts("synonym", lex, 8, WordTokenizer(), 0, seed=3)
    sel = [p for p in ps if p.half == 0]
    test = [p for p in ps if p.half == 1]
    assert sel and test
    assert not {p.template for p in sel} & {p.template for p in test}  # test templates are test-only
    assert not {p.words[3] for p in sel} & {p.words[3] for p in test}  # test pairs are new words
    assert not {p.pair_id for p in sel} & {p.pair_id for p in test}

"""CIH prompts: tokenisation checks, the conceptual prompt with its control and anchor swap,
frequency matching, the placebo relation, the morphological rule and the word-disjoint splits."""

from __future__ import annotations

import random
import re

import pytest

from fra.ingest.studies.cih.prompts import (
    ALL_TEMPLATES,
    FUNCTION_TEMPLATES,
    TEMPLATES,
    Lexicon,
    TokenisationError,
    WordPair,
    frequency_matched,
    load_lexicon,
    morphological,
    pair_prompts,
    placebo_pairs,
    read_pairs,
    split_pairs,
    study_prompts,
    template_halves,
    tokenise,
    unrelated,
    x_kind,
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
    assert len(TEMPLATES) >= 20 and len(FUNCTION_TEMPLATES) >= 8
    for t in TEMPLATES:
        assert "{A} {X}" in t and t.endswith("{B}") and "{N}" in t
        assert t.index("{A}") < t.index("{N}") < t.index("{B}")
    for t in FUNCTION_TEMPLATES:  # X is the template's own token after A
        assert "{X}" not in t and t.endswith("{B}") and t.index("{A}") < t.index("{N}") < t.index("{B}")
    assert [x_kind(i) for i in range(len(ALL_TEMPLATES))].count("function") == len(FUNCTION_TEMPLATES)


def test_pair_prompts_concept_control_and_anchor_swap_share_every_position():
    enc = WordTokenizer()
    pair = LEX.relations["synonym"][0]  # dog / hound
    fn = len(TEMPLATES)  # the first function-X template: "I saw the {A}, and later a {N} ..."
    prompts = pair_prompts(pair, 7, 1, (0, 5, fn), 1, LEX, enc, 0, random.Random(0))
    assert [p.role for p in prompts] == ["concept", "control", "swap"] * 3
    for i in range(0, len(prompts), 3):
        c, u, s = prompts[i : i + 3]
        assert c.pair_id == u.pair_id == s.pair_id == 7 and c.half == 1 and c.pair_set == 1
        assert len({len(c.tokens), len(u.tokens), len(s.tokens)}) == 1
        assert (c.a_pos, c.x_pos, c.n_pos) == (u.a_pos, u.x_pos, u.n_pos) == (s.a_pos, s.x_pos, s.n_pos)
        # control: differs from the conceptual prompt at A only; swap: differs from the control at N only,
        # where A now sits (B's relative present, but not before X)
        assert [t for t in range(len(c.tokens)) if c.tokens[t] != u.tokens[t]] == [c.a_pos]
        assert [t for t in range(len(u.tokens)) if u.tokens[t] != s.tokens[t]] == list(c.n_pos)
        assert s.tokens[c.n_pos[0]] == enc(" dog")[0] and c.tokens[c.a_pos] == enc(" dog")[0]
        assert c.tokens[c.q_pos] == enc(" hound")[0] and c.x_pos == c.a_pos + 1
        a_u, x, n, b = u.words
        assert a_u in ZIPF["noun"] and unrelated(a_u, ("dog", "hound", x, n))
        assert abs(ZIPF["noun"][a_u] - ZIPF["noun"]["dog"]) <= 0.5  # the band widens 0.25 -> 0.5 at most here
    # on the function-X template the token after A is the template's own comma
    c = prompts[6]
    assert c.template == fn and c.tokens[c.x_pos] == enc(",")[0] and c.words[1] == "<template>"
    # selection templates (half 0) have no anchor swap
    sel = pair_prompts(pair, 7, 0, (0, 5), 0, LEX, enc, 0, random.Random(0))
    assert [p.role for p in sel] == ["concept", "control"] * 2


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


def test_morphological_pairs_are_recognised():
    for a, b in [("fire", "firing"), ("vote", "voting"), ("hate", "hatred"), ("shot", "shooting"),
                 ("alone", "lonely"), ("thought", "thinking"), ("grey", "gray")]:  # fmt: skip
        assert morphological(a, b) and morphological(b, a)
    for a, b in [("dog", "hound"), ("car", "auto"), ("big", "large"), ("sea", "ocean")]:
        assert not morphological(a, b)


def test_shipped_synonyms_are_clean():
    lex = load_lexicon()
    syn = lex.relations["synonym"]
    assert len(syn) >= 100
    assert not [(p.A, p.B) for p in syn if morphological(p.A, p.B)]
    unordered = [frozenset((p.A.lower(), p.B.lower())) for p in syn]
    assert len(set(unordered)) == len(unordered)  # a pair and its reverse are one pair


def words(pairs):
    return {w.lower() for p in pairs for w in (p.A, p.B)}


def test_split_pairs_no_word_crosses_the_halves():
    # hand-made: dog-hound and hound-canine share 'hound', so they must land in one half
    pairs = [WordPair(a, b, "noun", "synonym") for a, b in
             [("dog", "hound"), ("hound", "canine"), ("car", "auto"), ("Auto", "motor"), ("cup", "mug"),
              ("road", "street"), ("lamp", "light"), ("boot", "shoe")]]  # fmt: skip
    for seed in range(20):
        a, b = split_pairs(pairs, random.Random(seed))
        assert len(a) + len(b) == len(pairs) and not words(a) & words(b)
        assert abs(len(a) - len(b)) <= 2
    # the shipped synonyms, as every seed of the study draws them
    syn = load_lexicon().relations["synonym"]
    for seed in range(5):
        rng = random.Random(seed)
        ps = list(syn)
        rng.shuffle(ps)
        a, b = split_pairs(ps[:40], rng)
        assert a and b and not words(a) & words(b)


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
    ps = study_prompts("synonym", lex.relations["synonym"], lex, 8, 4, WordTokenizer(), 0, seed=3)
    sel_t, test_t = template_halves(3)
    assert not set(sel_t) & set(test_t) and len(sel_t) + len(test_t) == len(ALL_TEMPLATES)
    sel = [p for p in ps if p.half == 0]
    test = [p for p in ps if p.half == 1]
    assert {p.template for p in sel} <= set(sel_t) and {p.template for p in test} <= set(test_t)
    # every pair is measured on both halves: selection templates and held-out ones
    assert {p.pair_id for p in sel} == {p.pair_id for p in test}
    # both families among the held-out templates: 3 noun-X and 1 function-X per pair
    assert {x_kind(p.template) for p in test} == {"noun", "function"}
    # the pair sets (for the fixed unit) share no word
    set0 = {p.words[3] for p in ps if p.pair_set == 0} | {
        p.words[0] for p in ps if p.pair_set == 0 and p.role == "concept"
    }
    set1 = {p.words[3] for p in ps if p.pair_set == 1} | {
        p.words[0] for p in ps if p.pair_set == 1 and p.role == "concept"
    }
    assert set0 and set1 and not set0 & set1


def test_read_pairs_validates_the_file(tmp_path):
    f = tmp_path / "p.json"
    f.write_text('[{"A": "dog", "B": "hound", "relation": "synonym"}]')
    assert read_pairs(f) == [WordPair("dog", "hound", "noun", "synonym")]
    for bad, msg in [("{}", "non-empty JSON list"), ('[{"A": "dog"}]', "item 0"), ("not json", "cannot read"),
                     ('[{"A": "a", "B": "b", "relation": "placebo"}]', "placebo")]:  # fmt: skip
        f.write_text(bad)
        with pytest.raises(ValueError, match=msg):
            read_pairs(f)


def test_validate_pairs_applies_the_shipped_rules_with_the_model():
    from types import SimpleNamespace

    import torch

    from fra.ingest.studies.cih.study import validate_pairs
    from fra.ingest.tools.testing import make_model

    model = make_model("llama")
    vocab = {" dog": 5, " hound": 6, " fire": 7, " firing": 8, " Dog": 9, " dogs": 10}

    def encode(s):
        return [vocab[s]] if s in vocab else [11 + (hash(w) % 20) for w in s.split()]

    setup = SimpleNamespace(model=model, encode=encode, lm=SimpleNamespace(bos_id=0))
    pairs = [
        WordPair("dog", "dog", "noun", "identity"),
        WordPair("dog", "Dog", "noun", "identity"),  # not an identity pair
        WordPair("dog", "dogs", "noun", "plural"),
        WordPair("fire", "firing", "noun", "synonym"),  # morphological
        WordPair("dog", "hound", "noun", "synonym"),
        WordPair("dog", "big red", "noun", "synonym"),  # two tokens
    ]
    # reference probability of " hound" after the prompt, by the model itself
    ids = [0] + encode("Another word for dog is")
    p = float(model(torch.tensor([ids]))[0, -1].softmax(-1)[6])
    kept, dropped = validate_pairs(setup, pairs, p / 2, "Another word for {A} is")
    assert [(q.A, q.B) for q in kept] == [("dog", "dog"), ("dog", "dogs"), ("dog", "hound")]
    assert dropped == {"not a identity pair": 1, "morphological": 1, "not single tokens": 1}
    kept, dropped = validate_pairs(setup, pairs, p * 2, "Another word for {A} is")
    assert ("dog", "hound") not in [(q.A, q.B) for q in kept] and dropped[f"model probability < {p * 2}"] == 1

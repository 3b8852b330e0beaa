"""Builds fra/ingest/assets/concept_pairs.json (shipped): the word pairs (A, B) and the filler-word
pools of the CIH study (`fra report cih`), validated by the model itself.

Sources: WordNet 3.0 (Debian `wordnet-base`, Princeton WordNet licence, which permits
redistribution with its notice: see the JSON's "licence" field), `wordfreq` (Zipf frequencies,
used for "common word" and to match control words in frequency; `pip install wordfreq`, needed
only to rebuild this file), the SmolLM2 tokenizer, and a hand-written English -> French / German /
Spanish list (below). Every word is a single token with a leading space.

Relations and how a pair is admitted:
- synonym: two lemmas of one WordNet noun or adjective synset, not morphological (no shared
  3-letter prefix, neither contains the other: fire/firing, vote/voting, hate/hatred are out;
  `prompts.morphological`), both Zipf >= MIN_ZIPF, and the model completes "Another word for A
  is" with " B" at probability >= P_MIN. One direction per unordered pair (the likelier one), so
  a pair and its reverse never count as two pairs.
- translation: EN -> FR/DE/ES from the hand list; the model completes "The French word for A
  is" (German, Spanish) with " B" at probability >= P_MIN.
- plural (A -> A+s) and capitalised (A -> A.capitalize()): orthographic relations, not
  conceptual. Capitalised pairs drop words whose capitalised form is also a WordNet proper-noun
  lemma or a common name (sue/Sue, will/Will): those are different concepts.
- identity (B = A): the token-repeat positive control; it shows the pipeline can find an
  induction channel when one exists.
The placebo relation is built at run time (fra/ingest/studies/cih/prompts.py).

Run: python scripts/make_concept_pairs.py   (about 10 minutes on 2 busy CPU cores)
     python scripts/make_concept_pairs.py --refilter   (applies the pair rules above to the shipped
     file without the model: they only remove pairs)
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from fra.ingest.registry import smollm2_hf
from fra.ingest.studies.cih.prompts import morphological

ASSET = Path("fra/ingest/assets/concept_pairs.json")

P_MIN = 0.05  # the model's probability of B after the validation prompt
MIN_ZIPF = 4.0  # "common": at least ~10 per million words (wordfreq Zipf scale)
# One-shot-style prompts: two worked examples set the format, so the probability measures whether
# the model knows the word, not whether it guesses the format. Pairs using the example words are dropped.
SYNONYM_PROMPT = "Another word for quick is fast. Another word for happy is glad. Another word for {A} is"
TRANSLATION_PROMPT = "The {lang} word for cat is {cat}. The {lang} word for {A} is"
EXAMPLE_WORDS = {"quick", "fast", "happy", "glad", "cat"}
N_SYNONYM_CANDIDATES = 10000  # cap on candidates (a seeded random subset when there are more)
FILLER_ZIPF = 3.0
WN = Path("/usr/share/wordnet")
NAMES = {
    "sue",
    "will",
    "mark",
    "bill",
    "rose",
    "may",
    "june",
    "april",
    "august",
    "jack",
    "pat",
    "art",
    "bob",
    "frank",
    "grace",
    "hope",
    "joy",
    "max",
    "ray",
    "rich",
    "rob",
    "don",
    "guy",
    "sky",
    "dawn",
    "faith",
    "lily",
    "victor",
    "violet",
    "ruby",
    "amber",
    "crystal",
    "summer",
    "jade",
    "rusty",
    "sandy",
    "penny",
    "holly",
    "ivy",
    "bud",
    "chuck",
    "dick",
    "gene",
    "hank",
    "herb",
    "jerry",
    "jimmy",
    "kelly",
    "lance",
    "matt",
    "nick",
    "norm",
    "rod",
    "russell",
    "sal",
    "stan",
    "ted",
    "terry",
    "tim",
    "tom",
    "wade",
    "warren",
    "wes",
    "china",
    "turkey",
    "die",
    "apple",
    "windows",
    "word",
    "amazon",
    "office",
    "times",
    "post",
    "sun",
    "mercury",
    "mars",
    "venus",
    "earth",
    "moon",
    "god",
    "lord",
    "bible",
    "church",
    "state",
    "congress",
    "president",
    "senate",
    "house",
    "union",
    "street",
    "river",
    "lake",
    "bay",
    "mount",
}

# Hand-written translation candidates (English noun or adjective -> French, German, Spanish).
# Only pairs that the model itself translates (P_MIN) and that are single tokens are kept.
TRANSLATIONS = {
    "French": {
        "dog": "chien",
        "cat": "chat",
        "house": "maison",
        "water": "eau",
        "bread": "pain",
        "book": "livre",
        "car": "voiture",
        "tree": "arbre",
        "sun": "soleil",
        "moon": "lune",
        "sea": "mer",
        "city": "ville",
        "king": "roi",
        "queen": "reine",
        "man": "homme",
        "woman": "femme",
        "child": "enfant",
        "friend": "ami",
        "day": "jour",
        "night": "nuit",
        "time": "temps",
        "world": "monde",
        "school": "école",
        "apple": "pomme",
        "milk": "lait",
        "cheese": "fromage",
        "wine": "vin",
        "horse": "cheval",
        "bird": "oiseau",
        "fish": "poisson",
        "flower": "fleur",
        "door": "porte",
        "window": "fenêtre",
        "table": "table",
        "chair": "chaise",
        "road": "route",
        "street": "rue",
        "black": "noir",
        "white": "blanc",
        "red": "rouge",
        "green": "vert",
        "blue": "bleu",
        "big": "grand",
        "small": "petit",
        "new": "nouveau",
        "old": "vieux",
        "good": "bon",
        "beautiful": "beau",
        "heart": "cœur",
        "love": "amour",
        "war": "guerre",
        "peace": "paix",
        "church": "église",
        "money": "argent",
        "work": "travail",
        "life": "vie",
        "death": "mort",
        "head": "tête",
        "hand": "main",
        "eye": "œil",
        "mouth": "bouche",
        "father": "père",
        "mother": "mère",
        "brother": "frère",
        "sister": "sœur",
        "garden": "jardin",
        "river": "rivière",
        "mountain": "montagne",
        "snow": "neige",
        "rain": "pluie",
        "fire": "feu",
        "country": "pays",
        "word": "mot",
        "letter": "lettre",
        "paper": "papier",
        "key": "clé",
        "train": "train",
        "boat": "bateau",
        "sky": "ciel",
        "earth": "terre",
    },
    "German": {
        "dog": "Hund",
        "cat": "Katze",
        "house": "Haus",
        "water": "Wasser",
        "bread": "Brot",
        "book": "Buch",
        "car": "Auto",
        "tree": "Baum",
        "sun": "Sonne",
        "moon": "Mond",
        "sea": "Meer",
        "city": "Stadt",
        "king": "König",
        "queen": "Königin",
        "man": "Mann",
        "woman": "Frau",
        "child": "Kind",
        "friend": "Freund",
        "day": "Tag",
        "night": "Nacht",
        "time": "Zeit",
        "world": "Welt",
        "school": "Schule",
        "apple": "Apfel",
        "milk": "Milch",
        "cheese": "Käse",
        "wine": "Wein",
        "horse": "Pferd",
        "bird": "Vogel",
        "fish": "Fisch",
        "flower": "Blume",
        "door": "Tür",
        "window": "Fenster",
        "table": "Tisch",
        "chair": "Stuhl",
        "road": "Straße",
        "black": "schwarz",
        "white": "weiß",
        "red": "rot",
        "green": "grün",
        "blue": "blau",
        "big": "groß",
        "small": "klein",
        "new": "neu",
        "old": "alt",
        "good": "gut",
        "heart": "Herz",
        "love": "Liebe",
        "war": "Krieg",
        "peace": "Frieden",
        "church": "Kirche",
        "money": "Geld",
        "work": "Arbeit",
        "life": "Leben",
        "death": "Tod",
        "head": "Kopf",
        "hand": "Hand",
        "eye": "Auge",
        "mouth": "Mund",
        "father": "Vater",
        "mother": "Mutter",
        "brother": "Bruder",
        "sister": "Schwester",
        "garden": "Garten",
        "river": "Fluss",
        "mountain": "Berg",
        "snow": "Schnee",
        "rain": "Regen",
        "fire": "Feuer",
        "country": "Land",
        "word": "Wort",
        "letter": "Brief",
        "paper": "Papier",
        "key": "Schlüssel",
        "train": "Zug",
        "boat": "Boot",
        "sky": "Himmel",
        "earth": "Erde",
    },
    "Spanish": {
        "dog": "perro",
        "cat": "gato",
        "house": "casa",
        "water": "agua",
        "bread": "pan",
        "book": "libro",
        "car": "coche",
        "tree": "árbol",
        "sun": "sol",
        "moon": "luna",
        "sea": "mar",
        "city": "ciudad",
        "king": "rey",
        "queen": "reina",
        "man": "hombre",
        "woman": "mujer",
        "child": "niño",
        "friend": "amigo",
        "day": "día",
        "night": "noche",
        "time": "tiempo",
        "world": "mundo",
        "school": "escuela",
        "apple": "manzana",
        "milk": "leche",
        "cheese": "queso",
        "wine": "vino",
        "horse": "caballo",
        "bird": "pájaro",
        "fish": "pez",
        "flower": "flor",
        "door": "puerta",
        "window": "ventana",
        "table": "mesa",
        "chair": "silla",
        "road": "camino",
        "street": "calle",
        "black": "negro",
        "white": "blanco",
        "red": "rojo",
        "green": "verde",
        "blue": "azul",
        "big": "grande",
        "small": "pequeño",
        "new": "nuevo",
        "old": "viejo",
        "good": "bueno",
        "heart": "corazón",
        "love": "amor",
        "war": "guerra",
        "peace": "paz",
        "church": "iglesia",
        "money": "dinero",
        "work": "trabajo",
        "life": "vida",
        "death": "muerte",
        "head": "cabeza",
        "hand": "mano",
        "eye": "ojo",
        "mouth": "boca",
        "father": "padre",
        "mother": "madre",
        "brother": "hermano",
        "sister": "hermana",
        "garden": "jardín",
        "river": "río",
        "mountain": "montaña",
        "snow": "nieve",
        "rain": "lluvia",
        "fire": "fuego",
        "country": "país",
        "word": "palabra",
        "letter": "carta",
        "paper": "papel",
        "key": "llave",
        "train": "tren",
        "boat": "barco",
        "sky": "cielo",
        "earth": "tierra",
    },
}


def clean(pairs: list[dict]) -> list[dict]:
    """Drop morphological pairs, and keep one direction of each unordered pair (the likelier)."""
    best = {}
    for p in pairs:
        if morphological(p["A"], p["B"]):
            continue
        key = frozenset((p["A"].lower(), p["B"].lower()))
        if key not in best or p.get("p_model", 0) > best[key].get("p_model", 0):
            best[key] = p
    keep = set(map(id, best.values()))
    return [p for p in pairs if id(p) in keep]


def refilter() -> None:
    """Apply `clean` to the shipped synonym and translation pairs (no model needed: it only removes)."""
    out = json.loads(ASSET.read_text())
    before = {r: len(v) for r, v in out["relations"].items()}
    for rel in ("synonym", "translation"):
        out["relations"][rel] = clean(out["relations"][rel])
    out["validation"]["pair_rules"] = "morphological pairs dropped; one direction per unordered pair"
    ASSET.write_text(json.dumps(out, ensure_ascii=False, indent=0))
    print({r: f"{before[r]} -> {len(v)}" for r, v in out["relations"].items()})


def main() -> None:
    from wordfreq import zipf_frequency  # needed only to rebuild the pools (pip install wordfreq)

    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads ran a forward pass 35x slower
    model, tok = smollm2_hf()

    def ids(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    def single(w):
        return len(ids(" " + w)) == 1

    @torch.no_grad()
    def probs(items: list[tuple[str, str]], batch: int = 64) -> list[float]:
        """P(" word" | BOS + prompt) for each (prompt, word), batched with right padding."""
        out = []
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            seqs = [[0] + ids(p) for p, _ in chunk]  # BOS, as in every FRA sample
            T = max(map(len, seqs))
            x = torch.tensor([s + [0] * (T - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
            hidden = model.model(input_ids=x, attention_mask=mask).last_hidden_state
            last = torch.tensor([len(s) - 1 for s in seqs])
            p = model.lm_head(hidden[torch.arange(len(seqs)), last]).softmax(-1)  # the unembedding at B only
            out += [float(p[j, ids(" " + w)[0]]) for j, (_, w) in enumerate(chunk)]
        return out

    def synsets(pos: str):
        for line in (WN / f"data.{pos}").read_text().splitlines():
            if line.startswith(" "):
                continue
            p = line.split()
            n = int(p[3], 16)
            yield [p[4 + 2 * i].split("(")[0] for i in range(n)]

    proper = {w for ss in synsets("noun") for w in ss if w[:1].isupper()}
    pools = {}
    for pos in ("noun", "adj"):
        words = sorted({w.lower() for ss in synsets(pos) for w in ss if w.isalpha() and w.islower()})
        pools[pos] = {
            w: round(zipf_frequency(w, "en"), 2)
            for w in words
            if 3 <= len(w) <= 10 and single(w) and zipf_frequency(w, "en") >= FILLER_ZIPF
        }
    print({k: len(v) for k, v in pools.items()}, flush=True)

    cands = set()
    for pos in ("noun", "adj"):
        for ss in synsets(pos):
            ss = [w for w in ss if w in pools[pos] and pools[pos][w] >= MIN_ZIPF]
            cands |= {(a, b, pos) for a in ss for b in ss if a != b and not morphological(a, b)}
    cands = sorted(c for c in cands if not {c[0], c[1]} & EXAMPLE_WORDS)
    n_all = len(cands)
    random.Random(0).shuffle(cands)
    cands = cands[:N_SYNONYM_CANDIDATES]
    print(f"{len(cands)} of {n_all} synonym candidates", flush=True)
    p1 = probs([(SYNONYM_PROMPT.format(A=a), b) for a, b, _ in cands])
    synonym = clean(
        [{"A": a, "B": b, "pos": pos, "p_model": round(x, 4)} for (a, b, pos), x in zip(cands, p1) if x >= P_MIN]
    )
    print(
        f"synonym: {len(synonym)} of {len(cands)} candidates pass p >= {P_MIN}; "
        f"p >= 0.01: {sum(x >= 0.01 for x in p1)}, p >= 0.1: {sum(x >= 0.1 for x in p1)}",
        flush=True,
    )

    tr_cands = [
        (lang, a, b)
        for lang, table in TRANSLATIONS.items()
        for a, b in table.items()
        if single(a) and single(b) and a not in EXAMPLE_WORDS and a.lower() != b.lower()
    ]  # table/table is a repeat
    n_tr = len(tr_cands)
    pt = probs(
        [(TRANSLATION_PROMPT.format(lang=lang, cat=TRANSLATIONS[lang]["cat"], A=a), b) for lang, a, b in tr_cands]
    )
    translation = clean(
        [
            {"A": a, "B": b, "pos": "noun" if a in pools["noun"] else "adj", "lang": lang, "p_model": round(p, 4)}
            for (lang, a, b), p in zip(tr_cands, pt)
            if p >= P_MIN
        ]
    )
    print(f"translation: {len(translation)} of {n_tr} single-token candidates pass")

    common = {w: z for w, z in pools["noun"].items() if z >= MIN_ZIPF}
    plural = [{"A": w, "B": w + "s", "pos": "noun"} for w in common if not w.endswith("s") and single(w + "s")]
    capitalised = [
        {"A": w, "B": w.capitalize(), "pos": "noun"}
        for w in common
        if single(w.capitalize()) and w.capitalize() not in proper and w not in NAMES
    ]
    identity = [{"A": w, "B": w, "pos": "noun"} for w in common]
    rng = random.Random(0)
    for lst in (synonym, translation, plural, capitalised, identity):
        rng.shuffle(lst)
    out = {
        "licence": "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Permission to use, "
        "copy, modify and distribute this software and database and its documentation for any purpose "
        "and without fee or royalty is hereby granted, provided that the above copyright notice and "
        "this statement appear on all copies.",
        "validation": {
            "p_min": P_MIN,
            "min_zipf": MIN_ZIPF,
            "filler_zipf": FILLER_ZIPF,
            "synonym_prompt": SYNONYM_PROMPT,
            "translation_prompt": TRANSLATION_PROMPT,
            "synonym_candidates": f"{len(cands)} (seeded random subset of {n_all})",
            "translation_candidates": f"{n_tr} single-token pairs of {sum(map(len, TRANSLATIONS.values()))}",
            "pair_rules": "morphological pairs dropped; one direction per unordered pair",
        },
        "relations": {
            "identity": identity[:150],
            "synonym": synonym,
            "translation": translation,
            "plural": plural[:150],
            "capitalised": capitalised[:150],
        },
        "kinds": {
            "identity": "positive control",
            "synonym": "conceptual",
            "translation": "conceptual",
            "plural": "orthographic",
            "capitalised": "orthographic",
            "placebo": "placebo",
        },
        "zipf": {"noun": pools["noun"], "adj": pools["adj"]},
    }
    ASSET.write_text(json.dumps(out, ensure_ascii=False, indent=0))
    print({k: len(v) for k, v in out["relations"].items()})
    print(synonym[:20])
    print(translation[:20])


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refilter", action="store_true", help="apply the pair rules to the shipped file, no model")
    if ap.parse_args().refilter:
        refilter()
    else:
        main()

"""Builds ingest/assets/concept_pairs.json (shipped) from WordNet 3.0 (Debian wordnet-base) and the
SmolLM2 tokenizer: word pairs (A, B) that are single tokens with a leading space, for the CIH
conceptual-repeat prompts. WordNet 3.0 is distributed under the Princeton WordNet licence, which
permits redistribution with its notice (see the JSON's "licence" field).

Relations: synonym (same noun synset, no shared 4-letter stem), plural (dog -> dogs),
capitalised (dog -> Dog), number (three -> 3). Run: python scripts/make_concept_pairs.py
"""

import json
import random
from pathlib import Path

from fra.ingest.models import smollm2_hf

_, tok = smollm2_hf()


def single(word):
    return len(tok(" " + word, add_special_tokens=False)["input_ids"]) == 1


lemmas_by_synset, freq_nouns = [], []
for line in Path("/usr/share/wordnet/data.noun").read_text().splitlines():
    if line.startswith(" "):
        continue
    parts = line.split()
    n = int(parts[3], 16)
    words = [parts[4 + 2 * i].lower() for i in range(n)]
    words = [w for w in words if w.isalpha()]
    lemmas_by_synset.append(words)

nouns = sorted({w for ws in lemmas_by_synset for w in ws if 3 <= len(w) <= 9 and single(w)})
synonyms = set()
for ws in lemmas_by_synset:
    ws = [w for w in ws if w in nouns]
    for a in ws:
        for b in ws:
            if a < b and a[:4] != b[:4] and a not in b and b not in a:
                synonyms.add((a, b))
plural = [(w, w + "s") for w in nouns if single(w + "s") and not w.endswith("s")]
capital = [(w, w.capitalize()) for w in nouns if single(w.capitalize())]
numbers = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
number = [(w, str(i + 1)) for i, w in enumerate(numbers) if single(w) and single(str(i + 1))]
rng = random.Random(0)
synonyms = sorted(synonyms)
rng.shuffle(synonyms); rng.shuffle(plural); rng.shuffle(capital)
out = {
    "licence": "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. Permission to use, copy, modify and distribute this software and database and its documentation for any purpose and without fee or royalty is hereby granted, provided that the above copyright notice and this statement appear on all copies.",
    "synonym": synonyms[:120], "plural": plural[:120], "capitalised": capital[:120], "number": number,
    "nouns": nouns,
}
Path("ingest/assets/concept_pairs.json").write_text(json.dumps(out))
print({k: len(v) for k, v in out.items() if k != "licence"}, synonyms[:10])

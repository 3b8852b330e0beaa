"""The command line (instant --help, generated from configs) and the corpus cutter."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fra.ingest.corpus import CorpusConfig, cut_samples, doc_split, paragraphs


def test_help_lists_commands_without_importing_torch():
    code = (
        "import sys; from fra.cli import build_parser; h = build_parser().format_help(); "
        "print('torch' in sys.modules, 'transformer_lens' in sys.modules, 'duckdb' in sys.modules); print(h)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    first, help_text = out.split("\n", 1)
    assert first == "False False False"
    for cmd in ("ingest", "query", "sql", "export", "app", "bench", "report", "census", "train-sae"):
        assert cmd in help_text


def test_cli_flags_come_from_the_config():
    from fra.cli import build_parser

    args = build_parser().parse_args(["ingest", "--layers", "17", "--heads", "1", "2", "--max-samples", "5"])
    from fra.cli import config_from_args
    from fra.ingest.index.build import IngestConfig

    cfg = config_from_args(IngestConfig, args)
    assert cfg.layers == (17,) and cfg.heads == (1, 2) and cfg.max_samples == 5 and cfg.top_keys == 4


def test_paragraphs_drop_short_and_non_text():
    text = "Short.\n\n" + "A real paragraph of text that is long enough.\n\n" + "-- 12 34 -- 56 78 -- 9 --"
    assert paragraphs(text) == ["A real paragraph of text that is long enough."]


def test_cut_samples_packs_whole_sentences_within_budget():
    count = lambda s: len(s.split())  # one token per word  # noqa: E731
    s10 = lambda w: " ".join([w] * 9) + " end."  # a 10-word sentence  # noqa: E731
    paras = [" ".join([s10("a"), s10("b"), s10("c")]), " ".join([s10("d"), s10("e")]), "f g h."]
    # budget = max_tokens - 1 = 25 words: a + b (20) fit, c would make 30 -> new sample. Paragraph 2
    # starts while the sample holds 10 words, less than half the budget (12), so d joins it (20);
    # e would make 30 -> new sample (10); "f g h." joins it (13). The final piece has fewer than
    # 16 words and is dropped.
    out = cut_samples(paras, count, max_tokens=26)
    assert out == [s10("a") + " " + s10("b"), s10("c") + " " + s10("d")]
    assert all(count(s) <= 25 for s in out)


def test_split_is_deterministic_and_roughly_one_in_twenty():
    splits = [doc_split(f"doc{i}", 20) for i in range(2000)]
    assert splits == [doc_split(f"doc{i}", 20) for i in range(2000)]
    assert 60 <= splits.count("heldout") <= 140


def test_corpus_config_validation():
    with pytest.raises(ValueError, match="unknown sources"):
        CorpusConfig(sources=("wikipedia",))
    with pytest.raises(ValueError, match="max_tokens"):
        CorpusConfig(max_tokens=4)


def test_preset_ingest_indexes_its_default_layers_not_every_shipped_sae():
    """SmolLM2's SAE directory also ships layers 3 and 24 (for `fra report cot`); `fra ingest`
    without --layers still indexes 17 and 18, and --layers 3 24 or --sae are kept as given."""
    from fra.ingest.index.job import IngestConfig, ingest_layers
    from fra.ingest.registry import shipped_sae_layers

    shipped = shipped_sae_layers("smollm2-135m")
    assert {3, 17, 18, 24} <= set(shipped)
    assert ingest_layers(IngestConfig(), shipped) == (17, 18)
    assert ingest_layers(IngestConfig(layers=(3, 24)), shipped) == (3, 24)
    assert ingest_layers(IngestConfig(sae="some/dir"), (5,)) == (5,)  # the SAEs' own layers
    assert ingest_layers(IngestConfig(model="gemma3-270m"), None) == (5, 11)

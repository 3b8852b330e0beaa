"""The whole CIH study: pairs -> measurements (study.py) -> tests (analysis.py) -> cih.json,
Parquet tables and report.md (report.py)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd

from . import analysis as A
from .config import CIHConfig
from .schema import Answer as AnswerRow
from .schema import Behaviour, Channel, CIHResults, PositiveControl, Verdict


def _rows(cls, df: pd.DataFrame, rename: dict | None = None) -> list:
    from dataclasses import fields

    df = df.rename(columns=rename or {})
    names = [f.name for f in fields(cls)]
    return [cls(**{n: (r[n].item() if hasattr(r[n], "item") else r[n]) for n in names}) for _, r in df.iterrows()]


def choose_pairs(cfg: CIHConfig, setup, lex) -> tuple[dict, dict]:
    """relation -> pairs to study, and relation -> {"available", "dropped"} (the report's counts)."""
    from .study import validate_pairs

    info = {}
    if cfg.pairs is not None:
        from .prompts import read_pairs

        user = read_pairs(cfg.pairs)
        kept, dropped = validate_pairs(setup, user, lex.validation["p_min"], lex.validation["synonym_prompt"])
        pairs = {}
        for p in kept:
            pairs.setdefault(p.relation, []).append(p)
        for rel in {p.relation for p in user}:
            info[rel] = dict(available=len(pairs.get(rel, [])), given=sum(p.relation == rel for p in user))
        info["_dropped"] = dropped
        if "identity" not in pairs:  # the positive control always runs
            pairs["identity"] = list(lex.relations["identity"])
            info["identity"] = dict(available=len(pairs["identity"]), given=0)
    else:
        pairs = {r: list(lex.relations.get(r, [])) for r in cfg.relations if r != "placebo"}
        info = {r: dict(available=len(v)) for r, v in pairs.items()}
    skipped = {r: len(v) for r, v in pairs.items() if len(v) < cfg.min_pairs_relation}
    pairs = {r: v for r, v in pairs.items() if r not in skipped}
    if "placebo" in cfg.relations or cfg.pairs is not None:
        import random

        from .prompts import placebo_pairs

        pairs["placebo"] = placebo_pairs(lex, random.Random(0))
        info["placebo"] = dict(available=len(pairs["placebo"]))
    for r, n in skipped.items():
        info[r]["skipped"] = f"only {n} pairs (< min_pairs_relation {cfg.min_pairs_relation})"
    return pairs, info


def run(cfg: CIHConfig, progress: bool = True):
    """The whole study; writes report.md, cih.json, the Parquet tables and the figures into cfg.out."""
    import torch

    from fra.ingest.studies.census import load_census

    from .prompts import load_lexicon
    from .study import Setup, run_seed

    t0 = time.time()
    rc = cfg.effective()
    torch.set_num_threads(rc.threads)
    torch.manual_seed(0)
    setup = Setup(rc)
    setup.lexicon = lex = load_lexicon()
    census = load_census(rc.model)
    tih = sorted(h for h in census["token_induction_heads"] if int(h.split(".")[0]) in rc.layers)
    pairs, info = choose_pairs(rc, setup, lex)
    recs, resid = {}, 0.0
    for seed in rc.seeds:
        r, res = run_seed(setup, rc, pairs, seed, progress, detail={tuple(map(int, h.split("."))) for h in tih})
        resid = max(resid, res)
        for k, v in r.items():
            recs.setdefault(k, []).extend(v)
    frames = {k: pd.DataFrame(v) for k, v in recs.items()}
    for rel in info:
        if rel in pairs:
            info[rel]["used_per_seed"] = int(
                frames["prompts"][frames["prompts"].relation == rel].groupby("seed")["pair_id"].nunique().mean()
            )
    from .report import model_description, sae_description, write_tables

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    # the measurements first: `reanalyse` can redo everything below from them
    run_info = dict(
        tih=tih, pairs=info, max_abs_residual=resid, model_text=model_description(setup),
        sae_text=sae_description(setup), seconds=time.time() - t0, tables=write_tables(out, frames),
    )  # fmt: skip
    (out / "cih_run.json").write_text(json.dumps(run_info, indent=1))
    results = reanalyse(out, rc, kinds=lex.kinds)
    if progress:
        print(f"CIH report written to {out}/report.md in {time.time() - t0:.0f} s")
    return results


def labels_of(model: str) -> dict:
    """(layer, feature) -> the label text of the shipped feature table ({} when there is none)."""
    from fra.ingest.registry import feature_labels

    return {key: str(label) for key, label in feature_labels(model).items()}


def analyse(
    frames: dict, cfg: CIHConfig, tih: list[str], kinds: dict, labels: dict, info: dict, resid: float, texts=("", "")
):
    """Tests, verdicts, answers and the stage-3c channels; returns the cih.json record and the
    derived tables the report shows."""
    c = A.Criteria(cfg.fdr, cfg.attn_floor, cfg.share_floor, cfg.min_pass, cfg.n_perm)
    ht = A.head_tests(frames["heads"], set(tih), c)
    ut = A.unit_tests(frames["groups"], frames["heads"], ht, c)
    v = A.verdicts(ut, len(cfg.seeds), c)
    ans = A.answers(v, tih)
    ans["relation_kind"] = ans["relation"].map(lambda r: kinds.get(r, "user"))
    cv = A.curve_table(frames["curves"], cfg.group_size)
    pc = A.positive_control(ans, cv, cfg.group_size, tih)
    unit = A.chosen_unit(pc)
    beh = A.behaviour(frames["heads"])
    fam, fam_summary = A.channel_families(frames["members"], tih, unit or "channel")
    if len(fam):
        fam = fam.assign(
            label_q=[labels.get((int(L), int(f)), "") for L, f in zip(fam.layer, fam.feat_q)],
            label_k=[labels.get((int(L), int(f)), "") for L, f in zip(fam.layer, fam.feat_k)],
            cls=fam["class"],
        )
    res = CIHResults(
        model=cfg.model,
        model_text=texts[0],
        sae_text=texts[1],
        layers=list(cfg.layers),
        seeds=list(cfg.seeds),
        tih=tih,
        chosen_unit=unit,
        positive_control=_rows(PositiveControl, pc),
        answers=_rows(AnswerRow, ans),
        verdicts=_rows(Verdict, v[v.tih | (v.n_pass > 0)]),  # the rest is in the tables
        channels=_rows(Channel, fam) if len(fam) else [],
        behaviour=_rows(Behaviour, beh),
        pairs=info,
        config={k: str(val) if isinstance(val, Path) else val for k, val in vars(cfg).items()},
        tables={},
        seconds=0.0,
        max_abs_residual=resid,
    )
    derived = dict(
        head_tests=ht,
        unit_tests=ut,
        curves=cv,
        x_kind=A.x_kind_heads(frames["heads"], tih),
        families=fam_summary,
        families_top=fam,
    )
    return res, derived


def reanalyse(out: Path, cfg: CIHConfig, kinds: dict | None = None) -> CIHResults:
    """Tests, cih.json and report.md from the measurements of a run in `out` (cih_run.json and
    the Parquet tables it names; no model needed), so the analysis can change without measuring
    again. `cfg` must be the measured run's config (seeds); its criteria may differ."""
    from .prompts import load_lexicon
    from .report import write_report

    out = Path(out)
    info = json.loads((out / "cih_run.json").read_text())
    frames = {name: pd.read_parquet(out / f) for name, f in info["tables"].items()}
    rc = cfg.effective()
    res, derived = analyse(
        frames, rc, info["tih"], kinds or load_lexicon().kinds, labels_of(rc.model), info["pairs"],
        info["max_abs_residual"], (info["model_text"], info["sae_text"]),
    )  # fmt: skip
    return write_report(out, res, derived, rc, info["seconds"], info["tables"])

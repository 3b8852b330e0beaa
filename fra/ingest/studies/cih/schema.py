"""The schema of cih.json: the study's summary that the report is written from and the explorer
reads. Standard library only (the app never imports torch or the study's code).

The full per-pair tables live next to it as Parquet (`tables` names them); cih.json keeps the
answers, the positive control, the verdicts per head and the stage-3c channels.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

SCHEMA_VERSION = 3


@dataclass(frozen=True)
class PositiveControl:
    """One unit kind on identity (B = A): passes when identity holds in every TIH."""

    unit: str
    passes: bool
    passes_matching: bool
    tih_passing: str  # comma-separated heads
    share_held_out: float  # top group_size units' share of the ff contrast, held-out templates, TIH mean
    share_in_sample: float


@dataclass(frozen=True)
class Answer:
    """H1/H2 for one relation and unit kind."""

    relation: str
    relation_kind: str
    unit: str
    n_tih: int
    h1: str  # "yes" / "no": every TIH holds (any label)
    h1_matching: str  # ... with matching units only
    tih_holding: str
    tih_holding_matching: str
    h2: str  # non-TIH heads that hold (any label), comma-separated
    h2_matching: str
    gated_heads: str  # heads passing the attention gate in >= min(2, seeds) seeds


@dataclass(frozen=True)
class Verdict:
    """One relation, unit kind and head, over seeds (the explorer's table)."""

    relation: str
    unit: str
    layer: int
    head: int
    name: str
    tih: bool
    n_pass: int
    n_pass_matching: int
    n_seeds: int
    holds: bool
    holds_matching: bool
    share: float  # held-out share of the head's contrast, mean over seeds
    contrast: float
    frac_matching: float
    attn_drop: float  # removing the unit from the head's scores at B (held-out conceptual prompts)
    attn_drop_random: float  # random channels matched on their contribution at X
    attn_drop_error: float  # removing the head's SAE-error terms instead
    swap_contrast: float
    placebo_contrast: float


@dataclass(frozen=True)
class Channel:
    """A channel of the per-pair groups in the TIH (stage 3c), with the report's feature labels."""

    layer: int
    feat_q: int
    feat_k: int
    label_q: str
    label_k: str
    heads: str
    n_pairs: int
    n_relations: int
    pair_rate: float
    contrast: float
    swap_ratio: float
    label: str  # commonest gating label
    cls: str  # structural / content / recurrent / other


@dataclass(frozen=True)
class Behaviour:
    relation: str
    x_kind: str
    n_pairs: int
    logp_x: float
    d_logp: float  # log P(X) conceptual minus control, mean over pairs
    d_logp_lo: float
    d_logp_hi: float
    d_logp_swap: float


@dataclass(frozen=True)
class CIHResults:
    model: str
    model_text: str  # what the model is and where it comes from
    sae_text: str  # the SAEs studied
    layers: list[int]
    seeds: list[int]
    tih: list[str]
    chosen_unit: str | None  # the unit kind that passed the positive control (None: none did)
    positive_control: list[PositiveControl]
    answers: list[Answer]
    verdicts: list[Verdict]
    channels: list[Channel]
    behaviour: list[Behaviour]
    pairs: dict  # relation -> {"available", "used_per_seed", "dropped": {reason: n}}
    config: dict
    tables: dict  # table name -> Parquet file next to cih.json
    seconds: float
    max_abs_residual: float
    schema_version: int = field(default=SCHEMA_VERSION)


_ROWS = {
    "positive_control": PositiveControl,
    "answers": Answer,
    "verdicts": Verdict,
    "channels": Channel,
    "behaviour": Behaviour,
}


def _clean(x):
    """NaN -> None (JSON has no NaN) and floats to 6 significant digits."""
    if isinstance(x, float):
        return None if math.isnan(x) else float(f"{x:.6g}")
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def save(res: CIHResults, path: Path) -> None:
    """Write cih.json (through a temporary file renamed into place)."""
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_clean(asdict(res)), indent=0, default=str))
    tmp.rename(path)


def _row(cls, d: dict):
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown or names - set(d):
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)}, missing {sorted(names - set(d))}")
    return cls(**{k: (math.nan if v is None and k not in ("chosen_unit",) else v) for k, v in d.items()})


def load(path: Path) -> CIHResults:
    """Read cih.json; raises ValueError when it is not this schema (an older report: re-run
    `fra report cih`)."""
    raw = json.loads(Path(path).read_text())
    if not isinstance(raw, dict) or raw.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path} is not a CIH report of schema {SCHEMA_VERSION} (found "
            f"{raw.get('schema_version') if isinstance(raw, dict) else type(raw).__name__}); re-run `fra report cih`"
        )
    names = {f.name for f in fields(CIHResults)}
    if set(raw) != names:
        raise ValueError(f"{path}: unknown keys {sorted(set(raw) - names)}, missing {sorted(names - set(raw))}")
    for key, cls in _ROWS.items():
        raw[key] = [_row(cls, r) for r in raw[key]]
    return CIHResults(**raw)

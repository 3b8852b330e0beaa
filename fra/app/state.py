"""URL parameters of the explorer: parsed, checked against what the index holds, and explained.

Pure functions (no Streamlit). A value from the URL is never passed to a widget unchecked: it is
either one of the allowed values, or it is replaced by the default and `Choice.problem` says what
was wrong and what is available.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Choice:
    value: int | str
    problem: str | None = None


def describe(allowed: Sequence[int]) -> str:
    """`0 to 4095` for a contiguous range, else the values (at most 12 of them)."""
    vals = list(allowed)
    if not vals:
        return "none"
    if len(vals) > 2 and vals == list(range(vals[0], vals[0] + len(vals))):
        return f"{vals[0]} to {vals[-1]}"
    shown = ", ".join(str(v) for v in vals[:12])
    return shown + (f", ... ({len(vals)} in all)" if len(vals) > 12 else "")


def pick_int(raw: str | None, name: str, allowed: Sequence[int], default: int, what: str, fallback: str = "") -> Choice:
    """The URL value `raw` of parameter `name` if it is one of `allowed`, else `default` with a reason.

    `what` names the set in the message ("layers of this index"); `fallback` says what is shown
    instead (default: the default value).
    """
    if raw is None or raw == "":
        return Choice(default)
    instead = fallback or f"showing {name} {default}"
    try:
        v = int(str(raw).strip())
    except ValueError:
        return Choice(
            default, f"{name}={raw!r} is not a whole number; {what}: {describe(allowed)}. {instead.capitalize()}."
        )
    if v not in allowed:
        return Choice(default, f"{name}={v} is not one of the {what} ({describe(allowed)}). {instead.capitalize()}.")
    return Choice(v)


def pick_page(raw: str | None, pages: Sequence[str], default: str) -> Choice:
    if raw is None or raw == "":
        return Choice(default)
    for p in pages:  # forgiving about case and '+' / '_' for spaces
        if str(raw).replace("+", " ").replace("_", " ").strip().lower() == p.lower():
            return Choice(p)
    return Choice(
        default, f"page={raw!r} is not a page of the explorer (pages: {', '.join(pages)}). Showing {default}."
    )


def query_string(params: dict) -> str:
    """`?a=1&b=x+y` with values quoted, for links inside the app."""
    from urllib.parse import urlencode

    return "?" + urlencode({k: v for k, v in params.items() if v is not None})

"""Text shown by the explorer: readable tokens and labels, and Markdown that cannot be mangled.

Pure functions (no Streamlit), tested directly.

Byte tokens: a byte-level BPE splits a multi-byte character (most CJK characters, emoji) over
several tokens, and decoding one such token alone gives U+FFFD ("�"). About 10% of the shipped
labels are such tokens. In a sample we know the text, so a run of broken tokens is aligned with
the characters it spells and each token is shown as `響[1/3]` (piece 1 of the 3 tokens that spell
響). A feature label has no text of its own, so it is shown with the decoded neighbours from its
first top-activating context: `‹byte› in 影‹byte›。`.
"""

from __future__ import annotations

import html
import re

BROKEN = "\ufffd"
BYTE = "‹byte›"
_VISIBLE = {"\n": "⏎", "\r": "␍", "\t": "⇥"}


def visible(tok: str) -> str:
    """A token with its control characters made visible (newline as ⏎, tab as ⇥)."""
    for a, b in _VISIBLE.items():
        tok = tok.replace(a, b)
    return tok


def readable_tokens(tokens: list[str], text: str | None) -> list[str]:
    """The tokens of a sample, each readable on its own (see the module docstring)."""
    out = [visible(t) for t in tokens]
    if not any(BROKEN in t for t in tokens):
        return out
    cursor, run = 0, []
    text = text or ""

    def close(end: int) -> None:
        span = visible(text[cursor:end]) if end >= cursor else ""
        for j, i in enumerate(run):
            out[i] = f"{span}[{j + 1}/{len(run)}]" if span.strip() else tokens[i].replace(BROKEN, BYTE)
        run.clear()

    for i, tok in enumerate(tokens):
        if BROKEN in tok:
            run.append(i)
            continue
        if tok and text.find(tok, cursor) < 0 and tok.lstrip():
            tok = tok.lstrip()  # the first token's leading space is often not in the text
        pos = text.find(tok, cursor) if tok else -1
        # a token far ahead of the cursor is not where we are (BOS, or a text that was cleaned up)
        if pos < 0 or (not run and pos - cursor > 8):
            continue
        if run:
            close(pos)
        cursor = pos + len(tok)
    if run:
        close(min(len(text), cursor + 4 * len(run)))
    return out


def readable_label(label: str | None, contexts=None) -> str:
    """A feature label with byte tokens named as such, and their neighbours from a context."""
    if label is None or label != label:  # None or NaN
        return ""
    label = visible(str(label))
    if BROKEN not in label:
        return label
    out = label.replace(BROKEN, BYTE)
    for c in list(contexts if contexts is not None else [])[:1]:
        m = re.search(r"(.{0,3})\[\[(.*?)\]\](.{0,3})", str(c), flags=re.S)
        if m:
            near = (m.group(1) + BYTE + m.group(3)).replace(BROKEN, "")
            out += f" in {visible(near)}"
    return out


_MD_SPECIAL = re.compile(r"[\\`*_{}\[\]()#+\-.!|~<>$&:^=\"']")


def md_text(s: str) -> str:
    """Plain text that Markdown (and Streamlit's LaTeX, links and HTML) leaves exactly as written;
    a lone byte token (U+FFFD, no text to align with) is named ‹byte›."""
    s = visible(s).replace(BROKEN, BYTE)
    return _MD_SPECIAL.sub(lambda m: f"&#{ord(m.group())};", s)


def md_context(context: str) -> str:
    """A top-activating context `before[[token]]after` as HTML-safe Markdown with the token in bold.

    Markdown does not bold `** the**` (a bold run cannot start with a space) and most tokens start
    with one, so the token is wrapped in <b> and its leading space is kept outside.
    """
    m = re.match(r"(.*?)\[\[(.*?)\]\](.*)", context, flags=re.S)
    if not m:
        return md_text(context)
    before, tok, after = m.groups()
    lead = tok[: len(tok) - len(tok.lstrip())]
    return f"{md_text(before + lead)}<b>{md_text(tok.lstrip()) or '&#9251;'}</b>{md_text(after)}"


def md_tokens(tokens: list[str], bold: dict[int, str] | None = None) -> str:
    """Tokens joined as text, with the positions in `bold` wrapped in <b> and a title (tooltip)."""
    bold = bold or {}
    parts = []
    for i, t in enumerate(tokens):
        if i in bold:
            lead = t[: len(t) - len(t.lstrip())]
            parts.append(
                f'{md_text(lead)}<b title="{html.escape(bold[i])}">{md_text(t.lstrip()) or "&#9251;"}<sub>{i}</sub></b>'
            )
        else:
            parts.append(md_text(t))
    return "".join(parts)


def html_tokens(
    tokens: list[str],
    weights: dict[int, float],
    titles: dict[int, str] | None = None,
    outline: dict[int, str] | None = None,
    values: dict[int, str] | None = None,
    rgb: tuple[int, int, int] = (33, 113, 181),
    tail: str = "",
) -> str:
    """Tokens as inline HTML, each on a background of `rgb` at opacity weights[i] (0..1), the way
    CircuitsVis colours attention and Neuronpedia colours activations.

    `titles` become tooltips, `outline` draws a labelled box around some tokens (the query), and
    `values` prints a small number after a token (its activation); `tail` is text shown after the
    tokens in grey."""
    titles, outline, values = titles or {}, outline or {}, values or {}
    parts = []
    for i, t in enumerate(tokens):
        w = max(0.0, min(1.0, float(weights.get(i, 0.0))))
        style = f"background: rgba({rgb[0]},{rgb[1]},{rgb[2]},{w:.3f}); border-radius: 3px; padding: 1px 0;"
        if w > 0.6:
            style += " color: white;"
        if i in outline:
            style += " outline: 2px solid #d62728; outline-offset: 1px;"
        title = html.escape(titles.get(i, f"{i}"), quote=True)
        sub = f"<sub>{md_text(values[i])}</sub>" if i in values else ""
        parts.append(f'<span title="{title}" style="{style}">{md_text(t) or "&#9251;"}{sub}</span>')
    grey = f'<span style="color: #999;">{md_text(tail)}</span>' if tail else ""
    return '<div style="line-height: 2.1; white-space: pre-wrap;">' + "".join(parts) + grey + "</div>"

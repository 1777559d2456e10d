"""One document model for everything the harness prints or writes, and its four renderers.

A `Document` is a title, a list of blocks and, for machines, `data` (a JSON-able mapping that the
JSON rendering carries as it is). Blocks:

- `Heading(text, level)`; `Paragraph(text)`: one paragraph of inline Markdown (`code` spans and
  [links](target); text from a run, such as descriptions, labels and messages, is escaped by every
  renderer, so it can never become raw HTML or a `javascript:` link);
- `Table(frame, ...)`: a pandas DataFrame, its index shown when it names something; `left` aligns
  every cell left in HTML, `emphasis` marks rows (bold in Markdown and HTML), `note` is a line
  under it, `text` chooses how terminal text lays it out ("pandas": as pandas prints a frame;
  "columns": left-aligned columns for long text cells);
- `Figure(stem, caption)`: `<stem>.png` and `<stem>.svg` in the document's folder;
- `Code(text)`: preformatted text (commands); `Items(items)`: a bulleted list.

Renderers: `to_markdown` (GitHub-flavoured), `to_html` (one self-contained page, PNGs embedded),
`to_text` (the terminal), `to_json`; `write_document` writes report.md and index.html atomically.
"""

from __future__ import annotations

import base64
import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pandas as pd

from harness.safe_io import terminal_text
from harness.store.files import atomic_write_text
from harness.store.files import to_json as json_text


@dataclass(frozen=True)
class Heading:
    """A section title; level 1 (the document's) to 3."""

    text: str
    level: int = 1


@dataclass(frozen=True)
class Paragraph:
    """One paragraph of inline Markdown."""

    text: str


@dataclass(frozen=True, eq=False)
class Table:
    """A table of `frame`; `index`: show the frame's index (None: when it is named or not a plain
    range); `left`: all cells left-aligned in HTML; `emphasis`: per row, whether it is stressed;
    `note`: a line under the table; `text`: the terminal layout ("pandas" or "columns")."""

    frame: pd.DataFrame
    index: bool | None = None
    left: bool = False
    emphasis: tuple[bool, ...] = ()
    note: str = ""
    text: Literal["pandas", "columns"] = "pandas"


@dataclass(frozen=True)
class Figure:
    """A figure saved as `<stem>.png` and `<stem>.svg` beside the document, with its caption."""

    stem: str
    caption: str


@dataclass(frozen=True)
class Code:
    """Preformatted text, shown as it is (a command line, a suite's overrides)."""

    text: str


@dataclass(frozen=True)
class Items:
    """A bulleted list; each item is inline Markdown like a Paragraph."""

    items: tuple[str, ...]


Block = Heading | Paragraph | Table | Figure | Code | Items


@dataclass
class Document:
    """A titled list of blocks; `data`: machine-readable facts, carried as they are by `to_json`."""

    title: str
    blocks: list[Block] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- tables


def cell_text(value: Any) -> str:
    """A table cell as text: "" for missing values, 4 significant digits for floats."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def shows_index(table: Table) -> bool:
    """Whether the table's index is shown: `Table.index`, else when it is named or not a plain range."""
    frame = table.frame
    return table.index if table.index is not None else frame.index.name is not None or not isinstance(frame.index, pd.RangeIndex)


def table_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    """(header, body) of a table as text; the index (when shown) is the first column, headed by the
    index and column names ("series \\ seq_len")."""
    frame = table.frame
    index = shows_index(table)
    corner = " \\ ".join(str(n) for n in (frame.index.name, frame.columns.name) if n)
    header = ([corner] if index else []) + [str(c) for c in frame.columns]
    body = [([str(i)] if index else []) + [cell_text(v) for v in row] for i, row in zip(frame.index, frame.to_numpy())]
    return header, body


def _stressed(table: Table, row: int) -> bool:
    return row < len(table.emphasis) and table.emphasis[row]


# --------------------------------------------------------------------------- Markdown


# A link target that may become a link: http(s), or a relative path (no scheme, not `//host`).
_SAFE_URL = re.compile(r"(?i)https?://[^\s<>\"'`\\]+|(?!//)[^\s:<>\"'`\\]+")
_CODE_SPAN = re.compile(r"(`[^`\n]+`)")
_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")  # how raw HTML (a tag, comment, declaration) or an autolink begins
_LINK = re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)")


def safe_url(url: str) -> bool:
    """Whether `url` (as written in Markdown: entities are decoded there) is http(s) or relative."""
    return bool(_SAFE_URL.fullmatch(html.unescape(url)))


def markdown_text(text: str) -> str:
    """`text` (which may hold user text: descriptions, labels, messages, file names) as Markdown
    that passes no raw HTML: outside code spans a `<` that would open a tag, comment or autolink becomes `&lt;`, and a link whose target
    is not http(s) or relative (`javascript:`, `data:`) is shown as text, not as a link."""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        part, pieces, last = _TAG_OPEN.sub("&lt;", parts[i]), [], 0
        for match in _LINK.finditer(part):  # brackets outside safe links escaped: no other link form survives
            pieces += [_brackets(part[last : match.start()]), match.group(0) if safe_url(match.group(2)) else _brackets(match.group(0))]
            last = match.end()
        parts[i] = "".join([*pieces, _brackets(part[last:])])
    return "".join(parts)


def _brackets(text: str) -> str:
    return text.replace("[", "\\[").replace("]", "\\]")


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text` (so the text cannot close it)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _markdown_table(table: Table) -> str:
    header, body = table_rows(table)

    def cell(text: str, strong: bool) -> str:
        shown = markdown_text(text).replace("|", "\\|").replace("\n", " ")
        return f"**{shown}**" if strong and shown else shown

    lines = ["| " + " | ".join(cell(h, False) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v, _stressed(table, i)) for v in row) + " |" for i, row in enumerate(body)]
    return "\n".join(lines) + (f"\n\n{markdown_text(table.note)}" if table.note else "")


def to_markdown(document: Document | list[Block]) -> str:
    """The blocks as GitHub-flavoured Markdown; text escaped by `markdown_text`."""
    out: list[str] = []
    for block in _blocks(document):
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + markdown_text(block.text))
        elif isinstance(block, Paragraph):
            out.append(markdown_text(block.text))
        elif isinstance(block, Code):
            fence = _fence(block.text)
            out.append(f"{fence}\n{block.text}\n{fence}")
        elif isinstance(block, Figure):
            caption = markdown_text(block.caption)
            out.append(f"![{caption}]({block.stem}.png)\n\n*{caption}* ([SVG]({block.stem}.svg))")
        elif isinstance(block, Table):
            out.append(_markdown_table(block))
        elif isinstance(block, Items):
            out.append("\n".join("- " + markdown_text(item) for item in block.items))
    return terminal_text("\n\n".join(out) + "\n")  # control characters from a run, shown as escapes


# --------------------------------------------------------------------------- HTML


def _inline(text: str) -> str:
    """HTML of one line of text: all of it escaped; code spans; only http(s) and relative links live."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)

    def link(match: re.Match) -> str:
        url = html.unescape(match.group(2))
        return f'<a href="{match.group(2)}">{match.group(1)}</a>' if safe_url(url) else match.group(0)

    return _LINK.sub(link, escaped)


_NUMBER = re.compile(r"[-+]?[\d,]*\.?\d+(e[-+]?\d+)?|")  # numbers (and empty cells) are right-aligned
CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td.t,th:first-child,table.left td{text-align:left}td:first-child{white-space:nowrap}
figure{margin:1.5em 0}
img{max-width:100%;height:auto}figcaption{font-size:14px;color:#444}pre{background:#f6f6f6;padding:.7em;overflow-x:auto}
code{background:#f3f3f3;padding:0 3px}"""


def _td(text: str, strong: bool = False) -> str:
    """A table cell: numbers right-aligned (the CSS default), text left-aligned."""
    shown = f"<strong>{html.escape(text)}</strong>" if strong and text else html.escape(text)
    return f"<td>{shown}</td>" if _NUMBER.fullmatch(text) else f'<td class="t">{shown}</td>'


def _html_table(table: Table) -> str:
    header, body = table_rows(table)
    rows = "".join("<tr>" + "".join(_td(v, _stressed(table, i)) for v in row) + "</tr>" for i, row in enumerate(body))
    css = ' class="left"' if table.left else ""
    out = f"<table{css}><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + f"</tr></thead><tbody>{rows}</tbody></table>"
    return out + (f"\n<p>{_inline(table.note)}</p>" if table.note else "")


def to_html(document: Document | list[Block], folder: Path, title: str | None = None) -> str:
    """The blocks as one HTML page; PNGs from `folder` embedded as base64, SVGs linked relatively."""
    title = title if title is not None else document.title if isinstance(document, Document) else ""
    out = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>',
        f"<style>{CSS}</style></head><body>",
    ]
    for block in _blocks(document):
        if isinstance(block, Heading):
            out.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Code):
            out.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
        elif isinstance(block, Figure):
            data = base64.b64encode((folder / f"{block.stem}.png").read_bytes()).decode("ascii")
            out.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.caption)}">'
                f'<figcaption>{_inline(block.caption)} (<a href="{block.stem}.svg">SVG</a>, '
                f'<a href="{block.stem}.png">PNG</a>)</figcaption></figure>'
            )
        elif isinstance(block, Table):
            out.append(_html_table(block))
        elif isinstance(block, Items):
            out.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>")
    out.append("</body></html>\n")
    return terminal_text("\n".join(out))  # no control character reaches the page (invalid in HTML)


# --------------------------------------------------------------------------- terminal text and JSON


def _text_table(table: Table) -> str:
    if table.text == "columns":  # left-aligned columns, two spaces apart; the last column unpadded
        header, body = table_rows(table)
        grid = [header, *body]
        widths = [max(len(row[i]) for row in grid) for i in range(len(header) - 1)]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1] for row in grid]
        text = "\n".join(line.rstrip() for line in lines)
    else:
        text = table.frame.to_string(index=shows_index(table))
    return text + (f"\n{table.note}" if table.note else "")


def to_text(document: Document | list[Block]) -> str:
    """The blocks as terminal text: a heading is "title:" after a blank line, a paragraph its text,
    list items indented by two spaces, tables as `Table.text` says; a blank line separates a table,
    list or code block from the paragraphs around it; control characters escaped (`terminal_text`:
    the text may come from a run someone sent). No trailing newline."""
    out: list[str] = []
    previous: Block | None = None
    for block in _blocks(document):
        gap = previous is not None and (
            isinstance(block, Heading)
            or (isinstance(block, (Table, Code)) and not isinstance(previous, Heading))
            or (isinstance(block, Paragraph) and isinstance(previous, (Table, Items, Code, Figure)))
        )
        if gap:
            out.append("")
        if isinstance(block, Heading):
            out.append(f"{block.text}:")
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Code):
            out.append(block.text)
        elif isinstance(block, Figure):
            out.append(f"figure {block.stem}.png: {block.caption}")
        elif isinstance(block, Table):
            out.append(_text_table(block))
        elif isinstance(block, Items):
            out += [f"  {item}" for item in block.items]
        previous = block
    return terminal_text("\n".join(out))


def block_json(block: Block) -> dict[str, Any]:
    """One block as a JSON-able mapping with its `type`; a table as its header and rows of text."""
    if isinstance(block, Table):
        header, body = table_rows(block)
        out: dict[str, Any] = {"type": "table", "header": header, "rows": body}
        if any(block.emphasis):
            out["emphasis"] = list(block.emphasis)
        return out | ({"note": block.note} if block.note else {})
    if isinstance(block, Heading):
        return {"type": "heading", "level": block.level, "text": block.text}
    if isinstance(block, Items):
        return {"type": "items", "items": list(block.items)}
    if isinstance(block, Figure):
        return {"type": "figure", "png": f"{block.stem}.png", "svg": f"{block.stem}.svg", "caption": block.caption}
    return {"type": "code" if isinstance(block, Code) else "paragraph", "text": block.text}


def to_json(document: Document) -> str:
    """The document as JSON: its `data` (as it is), its title and its blocks (`block_json`)."""
    return json_text({**document.data, "title": document.title, "blocks": [block_json(b) for b in document.blocks]})


def write_document(document: Document, folder: Path) -> None:
    """`report.md` and `index.html` of `document` in `folder` (atomically; figures already there)."""
    atomic_write_text(folder / "report.md", to_markdown(document))
    atomic_write_text(folder / "index.html", to_html(document, folder))


def _blocks(document: Document | list[Block]) -> list[Block]:
    return document.blocks if isinstance(document, Document) else document

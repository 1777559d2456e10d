"""harness.report.document: one document, four renderings (Markdown, HTML, terminal text, JSON).

Every expected text is written out here by hand, so a change of any renderer shows as a diff."""

from __future__ import annotations

import base64
import json

import pandas as pd

from harness.report.document import (
    Code,
    Document,
    Figure,
    Heading,
    Items,
    Paragraph,
    Table,
    to_html,
    to_json,
    to_markdown,
    to_text,
    write_document,
)

PIVOT = pd.DataFrame({512: ["1.5", "OOM"], 1024: ["3", ""]}, index=pd.Index(["full", "lsh"], name="series"))
PIVOT.columns.name = "seq_len"
PLAIN = pd.DataFrame({"cell": ["full L=512", "lsh L=1024"], "verdict": ["same", "REGRESSION"], "note": ["", "slower"]})


def test_markdown():
    document = Document(
        "t",
        [
            Heading("Run <b>x</b>"),
            Paragraph("see `a|b` and [docs](docs/x.md), not [bad](javascript:alert(1)) or <script>"),
            Table(PIVOT),
            Table(PLAIN, index=False, emphasis=(False, True), note="1 regression"),
            Heading("Commands", 2),
            Code("run ```x```"),
            Items(("one", "two <i>")),
        ],
    )
    assert to_markdown(document) == (
        "# Run &lt;b>x&lt;/b>\n\n"
        "see `a|b` and [docs](docs/x.md), not \\[bad\\](javascript:alert(1)) or &lt;script>\n\n"
        "| series \\ seq_len | 512 | 1024 |\n|---|---|---|\n| full | 1.5 | 3 |\n| lsh | OOM |  |\n\n"
        "| cell | verdict | note |\n|---|---|---|\n| full L=512 | same |  |\n| **lsh L=1024** | **REGRESSION** | **slower** |\n\n"
        "1 regression\n\n"
        "## Commands\n\n"
        "````\nrun ```x```\n````\n\n"
        "- one\n- two &lt;i>\n"
    )


def test_html_escapes_text_and_embeds_figures(tmp_path):
    png = b"\x89PNG fake"
    (tmp_path / "f.png").write_bytes(png)
    document = Document(
        "a <title>",
        [
            Paragraph("`x` [ok](r.md) [no](javascript:x)"),
            Figure("f", "caption <b>"),
            Table(PLAIN, index=False, left=True, emphasis=(True, False)),
            Items(("<li>",)),
        ],
    )
    page = to_html(document, tmp_path)
    assert "<title>a &lt;title&gt;</title>" in page
    assert '<p><code>x</code> <a href="r.md">ok</a> [no](javascript:x)</p>' in page
    data = base64.b64encode(png).decode()
    assert f'<img src="data:image/png;base64,{data}" alt="caption &lt;b&gt;">' in page and '<a href="f.svg">SVG</a>' in page
    assert '<table class="left"><thead><tr><th>cell</th><th>verdict</th><th>note</th></tr></thead>' in page
    assert '<tr><td class="t"><strong>full L=512</strong></td><td class="t"><strong>same</strong></td><td></td></tr>' in page
    assert "<ul><li>&lt;li&gt;</li></ul>" in page and page.endswith("</body></html>\n")


def test_terminal_text():
    document = Document(
        "t",
        [
            Heading("median time (ms)"),
            Table(PIVOT, note="(*: contended)"),
            Heading("not ok"),
            Items(("lsh L=512: oom",)),
            Paragraph("2 cells: 1 ok, 1 oom"),
            Paragraph("results: results/x"),
        ],
    )
    assert to_text(document) == "\n".join(
        [
            "median time (ms):",
            PIVOT.to_string(),
            "(*: contended)",
            "",
            "not ok:",
            "  lsh L=512: oom",
            "",
            "2 cells: 1 ok, 1 oom",
            "results: results/x",
        ]
    )
    columns = to_text([Paragraph("run: a"), Table(PLAIN, index=False, text="columns"), Paragraph("FAIL")])
    assert columns == "\n".join(
        ["run: a", "", "cell        verdict     note", "full L=512  same", "lsh L=1024  REGRESSION  slower", "", "FAIL"]
    )


def test_json_keeps_the_data_and_lists_the_blocks():
    document = Document("check", [Heading("h", 3), Table(PLAIN, index=False, emphasis=(False, True)), Figure("f", "c")], {"status": "fail"})
    data = json.loads(to_json(document))
    assert data["status"] == "fail" and data["title"] == "check"
    assert data["blocks"][0] == {"type": "heading", "level": 3, "text": "h"}
    assert data["blocks"][1] == {
        "type": "table",
        "header": ["cell", "verdict", "note"],
        "rows": [["full L=512", "same", ""], ["lsh L=1024", "REGRESSION", "slower"]],
        "emphasis": [False, True],
    }
    assert data["blocks"][2] == {"type": "figure", "png": "f.png", "svg": "f.svg", "caption": "c"}


def test_write_document_writes_both_files(tmp_path):
    write_document(Document("t", [Heading("x")]), tmp_path)
    assert (tmp_path / "report.md").read_text() == "# x\n" and "<h1>x</h1>" in (tmp_path / "index.html").read_text()

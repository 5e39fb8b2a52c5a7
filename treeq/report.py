"""A self-contained HTML report: tables and figures in one file a person opens in a browser.

Figures are embedded as base64 PNGs, so the page can be mailed or archived without its run
folder; nothing is fetched from the network when it opens.
"""
import base64
import html
from pathlib import Path

from .io import atomic_write

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.15rem; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.6rem; text-align: left; }
th { background: #f0f0f0; } td.number { text-align: right; }
tr.highlight td { background: #eef6ee; font-weight: 600; }
figure { margin: 1rem 0; } figcaption { font-size: 0.85rem; color: #555; }
img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
p.note { font-size: 0.9rem; color: #444; }
"""


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else html.escape(str(value))


def _td(value):
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"<td class=\"number\">{_cell(value)}</td>" if numeric else f"<td>{_cell(value)}</td>"


def table_html(rows, highlight=lambda row: False):
    """An HTML table of flat dicts sharing keys; rows for which `highlight(row)` is true stand out."""
    if not rows:
        return "<p>(no rows)</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    marked = ' class="highlight"'
    body = "".join(f"<tr{marked if highlight(row) else ''}>" + "".join(_td(row.get(k)) for k in keys) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(path, caption):
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def write_report(path, title, sections):
    """Write `sections` — (heading, [html fragment, ...]) pairs — as one page at `path`."""
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for heading, fragments in sections:
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        parts.extend(fragments)
    page = (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")
    atomic_write(path, lambda p: p.write_text(page, encoding="utf-8"))
    return Path(path)


def note_html(text):
    return f'<p class="note">{html.escape(text)}</p>'

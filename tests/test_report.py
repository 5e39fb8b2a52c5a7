"""The HTML report is one self-contained file: tables escaped, figures embedded."""
import base64

from treeq.eval.export import save_grid_png
from treeq.report import figure_html, note_html, table_html, write_report


def test_report_embeds_figures_and_escapes_text(tmp_path):
    import torch
    save_grid_png(torch.zeros(4, 1, 8, 8), tmp_path / "grid.png", nrow=2)
    rows = [{"method": "fp", "fid": 78.04}, {"method": "<treeq>", "fid": None}]
    page = write_report(tmp_path / "report.html", "TreeQ & friends", [
        ("Table", [table_html(rows, highlight=lambda row: row["method"] == "<treeq>")]),
        ("Samples", [figure_html(tmp_path / "grid.png", "FP | TreeQ"), note_html("5 < 6")])]).read_text()
    assert "TreeQ &amp; friends" in page and "&lt;treeq&gt;" in page and "5 &lt; 6" in page
    assert '<tr class="highlight"><td>&lt;treeq&gt;</td><td>-</td>' in page and '<td class="number">78.04</td>' in page
    embedded = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(embedded) == (tmp_path / "grid.png").read_bytes()
    assert "http" not in page  # nothing fetched when it opens

"""Markdown tables of `treeq bench families --json` output files (one or more, merged), for docs/RESULTS.md.

    python scripts/families_tables.py /tmp/bench-families.json [more.json ...]
"""
import json
import sys


def _value(rows, family, quantity):
    for row in rows:
        if row["family"] == family and row["quantity"] == quantity:
            return row
    return None


def _cell(row, digits=3, scale=1.0, mark=True):
    if row is None or row["value"] is None:
        return "-"
    value = row["value"] * scale
    text = f"{value:,.0f}" if abs(value) >= 1000 or float(value).is_integer() else f"{value:.{digits}g}"
    return text + (" (p)" if mark and row["basis"] == "projected" else "")


def main(paths):
    rows = [row for path in paths for row in json.loads(open(path).read())]
    families = list(dict.fromkeys(row["family"] for row in rows))
    kinds = {}
    for row in rows:
        if row["part"] == "blocks" and row["quantity"].endswith("forward fp32, 1 row"):
            kinds.setdefault(row["family"], []).append(row["quantity"].split(" forward")[0])
    full = [f for f in families if _value(rows, f, "parameters")]
    if full:
        print("| family | parameters | quantizable linears | blocks | tokens per sample |")
        print("|---|---|---|---|---|")
        for f in full:
            print(f"| {f} | {_cell(_value(rows, f, 'parameters'))} B | {_cell(_value(rows, f, 'quantizable linears'))} "
                  f"| {_value(rows, f, 'blocks')['value']} ({_value(rows, f, 'blocks')['note']}) "
                  f"| {_value(rows, f, 'tokens per sample')['note']} |")
        print()
    if kinds:
        print("| family | block (built alone at real width) | fp32, 1 row (s) | W4A4, 1 row (s) | fp32, 16 rows (s) "
              "| W4A4, 16 rows (s) |")
        print("|---|---|---|---|---|---|")
        for f, names in kinds.items():
            for kind in names:
                cells = [_cell(_value(rows, f, f"{kind} forward {s}, {r}")) for r in ("1 row", "16 rows")
                         for s in ("fp32", "W4A4")]
                print(f"| {f} | {kind} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
        print()
        print("| family | evaluations (queue 16) | block-runs per evaluation | one evaluation (s, 16 rows) "
              "| whole search, scoring (days) |")
        print("|---|---|---|---|---|")
        for f in kinds:
            print(f"| {f} | {_cell(_value(rows, f, 'evaluations (expected_evaluations)'))} "
                  f"| {_cell(_value(rows, f, 'block-runs per evaluation'), mark=False)} "
                  f"| {_cell(_value(rows, f, 'one evaluation'), mark=False)} "
                  f"| {_cell(_value(rows, f, 'whole search (scoring)'), scale=1 / 86400, mark=False)} |")
        print()
    quantized = [f for f in families if _value(rows, f, "treeq quantize peak (projected_peaks)")]
    if quantized:
        print("| family | build (s) | quantize, swap + rtn (s) | codes (s) | peak RSS (GiB) | resident, measured (GB) "
              "| resident, projected (GB) | treeq quantize peak, projected (GB) |")
        print("|---|---|---|---|---|---|---|---|")
        for f in quantized:
            cells = [_cell(_value(rows, f, q), mark=False) for q in (
                "build (random init)", "quantize (swap + rtn)", "codes of every layer", "peak RSS",
                "resident bytes (resident_bytes)", "resident bytes (project_resident_bytes)",
                "treeq quantize peak (projected_peaks)")]
            print(f"| {f} | " + " | ".join(cells) + " |")
        print()
    tiny = [f for f in families if _value(rows, f, "TreeQ search")]
    if tiny:
        print("| family (tiny) | uniform W4A4 PSNR (dB) | TreeQ W4A4 PSNR (dB) | uniform rel. error | TreeQ rel. error "
              "| TreeQ avg bits | evaluations | search (s) |")
        print("|---|---|---|---|---|---|---|---|")
        for f in tiny:
            search = _value(rows, f, "TreeQ search")
            cells = [_cell(_value(rows, f, q), digits=4) for q in (
                "uniform W4A4 PSNR vs FP", "TreeQ W4A4 PSNR vs FP", "uniform W4A4 output relative error",
                "TreeQ W4A4 output relative error", "TreeQ average bits (BOPs)")]
            print(f"| {f} | " + " | ".join(cells) + f" | {search['note'].split(' evaluations')[0]} "
                  f"| {search['value']:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])

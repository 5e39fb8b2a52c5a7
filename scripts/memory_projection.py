"""Projected memory of DiT-XL/2 and FLUX.1 quantized at their real shapes (treeq.memory), without
building either: the resident model at one and at four code widths, with and without the dequantized
cache, and the tensors `treeq quantize` / `treeq search` hold at once per phase. GB = 1e9 bytes.

    PYTHONPATH=. python scripts/memory_projection.py
"""
from treeq.memory import dit_shapes, flux_shapes, project_resident_bytes, projected_peaks


def main():
    gb = lambda value: f"{value / 1e9:7.2f}"  # noqa: E731
    for name, (shapes, other) in (("DiT-XL/2", dit_shapes("DiT-XL/2")), ("FLUX.1", flux_shapes())):
        fp32 = sum(4 * out * inp + (4 * out if bias else 0) for out, inp, bias in shapes) + other
        print(f"{name}: {len(shapes)} quantized linears, FP32 parameters {gb(fp32)} GB")
        print("  resident (GB)                      weights  codes  caches   total  x FP32")
        for widths, cache in ((1, False), (1, True), (4, False)):
            r = project_resident_bytes(shapes, other, code_widths=widths, cache_dequantized=cache)
            label = f"{widths} code width{'s' if widths > 1 else ''}, cache {'on' if cache else 'off'}"
            print(f"  {label:<32} {gb(r['weights'])} {gb(r['codes'])} {gb(r['caches'])} {gb(r['total'])}"
                  f"  {r['total'] / fp32:5.2f}")
        for title, options in (("round-to-nearest, codes at 1 width", {"code_widths": 1}),
                               ("gptq, codes at 4 widths (the search's 3, 4, 6, 8)", {"code_widths": 4, "gptq": True})):
            print(f"  {title}:")
            for phase, parts in projected_peaks(shapes, other, **options).items():
                shown = ", ".join(f"{part} {gb(size).strip()}" for part, size in parts.items() if part != "total")
                print(f"    {phase:<15} {gb(parts['total'])} GB  ({shown})")


if __name__ == "__main__":
    main()

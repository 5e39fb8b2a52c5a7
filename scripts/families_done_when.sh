#!/usr/bin/env bash
# The families' end-to-end check (issue 19's Done-when), run from a checkout with .venv: for each family, init -> quantize (GMB) -> sample; search -> quantize.
set -euo pipefail
T=${T:-.venv/bin/treeq}
W=${W:-/tmp/dw19}
rm -rf "$W"; mkdir -p "$W"
for F in pixart sd3 flux; do
  start=$(date +%s)
  $T init --family $F --size tiny --out $W/P-$F
  $T quantize --model $W/P-$F --config W4A4 --method hadamard,gptq --branch monarch --out $W/R-$F 2>&1 | tail -1
  $T sample --quant $W/R-$F --num-samples 2 --out $W/S-$F 2>&1 | tail -1
  test -s $W/S-$F/samples.npz && test -s $W/S-$F/grid.png
  $T search --model $W/P-$F --target W4A4 --out $W/b-$F.json 2>&1 | tail -1
  $T quantize --model $W/P-$F --config $W/b-$F.json --out $W/Q-$F 2>&1 | tail -1
  cmp <(python3 -c "import json,sys; print(json.dumps(json.load(open('$W/b-$F.json')), sort_keys=True))") \
      <(python3 -c "import json,sys; print(json.dumps(json.load(open('$W/Q-$F/bits.json')), sort_keys=True))")
  echo "$F: done in $(( $(date +%s) - start )) s"
done

#!/bin/bash
# The DiT-XL/2 and kernel measurements of docs/RESULTS.md on one CUDA GPU (random weights), in one run:
#   OUT=folder scripts/gpu_measurements.sh
# Each step has its own time limit and writes its output under $OUT, so a failing or slow step
# leaves the others' figures. PY: the Python with torch + CUDA (default python3); SIZE, INIT_ARGS,
# DEVICE, NUM: a smaller model, the CPU, fewer samples, for trying the script. STEPS: the steps to run,
# or a group: deploy (kernels and end-to-end rows of the deployed models: torchao export, fused Triton
# kernel, bf16 eager and compiled; under 10 minutes) or search (the search at DiT-XL/2's cost: a full
# tree search needs most of a 15-minute lease), families (a random full-size SD3 quantized in bf16 with GPTQ
# at 256 px and sampled: time and peak GPU memory against the printed memory plan) or search-families (the
# default search on that SD3 at 256 px, printed cost against what it ran, then with the tss-fast levers). Default: families,
# search-families, deploy, search, then the 1,000-sample run.
# The device image has torch and Triton but not torchao or diffusers: carry their wheels (see the device
# notes); without torchao the torchao rows say so in an `error` row and the rest still runs.
set -u
expanded=""
for word in ${STEPS:-families search-families deploy search sample1000}; do  # groups into their steps
  case $word in
    families) expanded+=" families_init families_quantize families_sample" ;;
    search-families) expanded+=" search_families search_families_fast" ;;
    deploy) expanded+=" gpu_kernels xl xl_compiled" ;;
    search) expanded+=" search_cost search" ;;
    *) expanded+=" $word" ;;
  esac
done
STEPS=$expanded
PY=${PY:-python3}
OUT=${OUT:-runs/gpu}
WORK=${WORK:-/tmp/treeq-gpu}
SIZE=${SIZE:-DiT-XL/2}
INIT_ARGS=${INIT_ARGS:-}
VAE_ARGS=${VAE_ARGS:-}
DEVICE=${DEVICE:-cuda}
NUM=${NUM:-1000}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
step() {  # step NAME SECONDS COMMAND...: run, keep its output in $OUT/NAME.txt, report its time and status
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return ;; esac
  local start=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s"; tr "\r" "\n" < "$OUT/$name.txt" | tail -n 3
}
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; fi
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
STEPS="init $STEPS" step init 100 bash -c "$PY -m treeq init --size $SIZE $INIT_ARGS --out $WORK/xl.pt && $PY -m treeq init --size vae $VAE_ARGS --out $WORK/vae"
# The search at DiT-XL/2's real cost: one block run measured, the 28-block search's count and memory.
step search_cost 120 $PY -m treeq bench search-cost --device $DEVICE --json
# A full tree search (it prints its own time estimate first), GPU memory sampled every 0.5 s.
if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/search_gpu_mb.txt" &
fi
step search 540 $PY -m treeq search --model "$WORK/xl.pt" --target W4A4 --method tss --device $DEVICE \
    --calibration-images 4 --calibration-timesteps 4 --out "$WORK/search/bits.json"
kill %1 2>/dev/null
echo "search: $(cat "$WORK"/search/bits.log.jsonl 2>/dev/null | wc -l) candidates scored;" \
     "peak GPU MiB (nvidia-smi): $(sort -n "$OUT/search_gpu_mb.txt" 2>/dev/null | tail -1)"
# A random SD3 at its published size (2.03 B parameters): quantized in bf16 with GPTQ at 256 px, then sampled.
gpu_memory() {  # gpu_memory NAME: nvidia-smi's used MiB every 0.5 s into $OUT/NAME_gpu_mb.txt (stop: kill %1)
  [ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/$1_gpu_mb.txt" &
}
step families_init 200 $PY -m treeq init --family sd3 --size full --out "$WORK/sd3"
gpu_memory families_quantize
step families_quantize 400 $PY -m treeq quantize --model "$WORK/sd3" --dtype bfloat16 --method hadamard,gptq \
    --config W4A4 --height 256 --width 256 --calibration-images 4 --calibration-timesteps 4 --steps 8 --device $DEVICE \
    --out "$WORK/sd3-run"
kill %1 2>/dev/null
echo "families_quantize: peak GPU MiB (nvidia-smi): $(sort -n "$OUT/families_quantize_gpu_mb.txt" 2>/dev/null | tail -1)"
step families_sample 200 $PY -m treeq sample --quant "$WORK/sd3-run" --height 256 --width 256 --steps 8 \
    --num-samples 4 --device $DEVICE --out "$WORK/sd3-samples"
gpu_memory search_families
step search_families 540 $PY -m treeq search --model "$WORK/sd3" --dtype bfloat16 --height 256 --width 256 --steps 8 \
    --calibration-images 4 --calibration-timesteps 4 --target W4A4 --device $DEVICE --out "$WORK/sd3-search/bits.json"
kill %1 2>/dev/null
echo "search_families: peak GPU MiB (nvidia-smi): $(sort -n "$OUT/search_families_gpu_mb.txt" 2>/dev/null | tail -1);" \
     "compute: $(grep -o '"image_equivalents": [0-9.e+-]*' "$WORK"/sd3-search/bits.results.json 2>/dev/null)"
# The same search with the cost levers of bench search's tss-fast (a tenth of the default at real size).
step search_families_fast 300 $PY -m treeq search --model "$WORK/sd3" --dtype bfloat16 --height 256 --width 256 \
    --steps 8 --calibration-images 4 --calibration-timesteps 4 --target W4A4 --device $DEVICE --readout-blocks 0 \
    --low-rows 4 --queue-size 8 --low-queue 4 --out "$WORK/sd3-search-fast/bits.json"
echo "search_families_fast: compute: $(grep -o '"image_equivalents": [0-9.e+-]*' \
     "$WORK"/sd3-search-fast/bits.results.json 2>/dev/null)"
# Linear shapes: fp32, tf32, bf16, int8, the fused W4A8 Triton kernel bare and with a low-rank branch.
[ "$DEVICE" = cuda ] && step gpu_kernels 90 $PY -m treeq bench gpu-kernels --json
# End to end, seconds per sampling step and peak memory; eager, then the compiled settings apart (compilation).
step xl 240 $PY -m treeq bench xl --device $DEVICE --model "$WORK/xl.pt" --json \
    --settings fp32,bf16,W4A4,W8A8-int,W4A4-torchao,W4A8-torchao,W4A8-triton
step xl_compiled 240 $PY -m treeq bench xl --device $DEVICE --model "$WORK/xl.pt" --json \
    --settings bf16+compile,W4A8-torchao+compile
step sample1000 150 $PY -m treeq sample --model "$WORK/xl.pt" --vae "$WORK/vae" --device $DEVICE --dtype bfloat16 \
    --num-samples $NUM --steps 50 --batch-size 125 --quiet --out "$WORK/s1000"

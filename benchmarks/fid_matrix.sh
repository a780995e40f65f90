#!/usr/bin/env bash
# FID / sFID / Precision / Recall and PSNR/SSIM vs FP for a matrix of quantized models, as
# PROTOCOL.md asks (10k samples, DDPM 250/100/50, cfg 1.5, same noise for every model).
#
#   MODEL=dit_s2_cifar10.pt REF=cifar_train_stats.npz INCEPTION=pt_inception-...-fp16.pth \
#   OUT=runs/matrix GPUS=4 bash benchmarks/fid_matrix.sh
#
# Every step is skipped when its output exists, so a run cut off by a time limit continues
# where it stopped when started again. Each line of RUNS is "name|ditq quantize flags"; the
# FP baseline is the run named fp. The run directories are what `ditq report` reads.
set -euo pipefail
: "${MODEL:?checkpoint}" "${REF:?reference statistics npz (ditq eval --build-ref)}"
: "${INCEPTION:?Inception weights}" "${OUT:=runs/matrix}" "${GPUS:=1}"
: "${NUM_SAMPLES:=10000}" "${BATCH:=1000}" "${STEPS:=250 100 50}" "${DTYPE:=bf16}"
: "${MODEL_FLAGS:=--vae none}" "${CLASSES:=0,1,2,3,4,5,6,7,8,9}"
: "${RUNS:=fp|
ptq4dit-w8a8|--method ptq4dit --wbits 8 --abits 8
ptq4dit-w4a8|--method ptq4dit --wbits 4 --abits 8
ditas-w8a8|--method ditas --wbits 8 --abits 8
ditas-w4a8|--method ditas --wbits 4 --abits 8
single-step-w8a8|--method single-step --wbits 8 --abits 8
single-step-w4a8|--method single-step --wbits 4 --abits 8}"

if [ "$GPUS" -gt 1 ]; then
  SAMPLE=(torchrun --nproc-per-node "$GPUS" -m ditq sample)
else
  SAMPLE=(python -m ditq sample)
fi

while IFS='|' read -r name flags; do
  [ -n "$name" ] || continue
  dir="$OUT/$name"
  mkdir -p "$OUT"
  if [ "$name" = fp ]; then
    mkdir -p "$dir"
    source_model="$MODEL"
    echo '{"name": "fp", "method": "fp", "bits": "FP"}' > "$dir/run.json"
  else
    # shellcheck disable=SC2086
    [ -f "$dir/ditq.json" ] || python -m ditq quantize --model "$MODEL" $MODEL_FLAGS $flags \
      --out "$dir" --quiet
    source_model="$dir"
  fi
  for steps in $STEPS; do
    samples="$dir/samples_ddpm$steps.npz"
    # shellcheck disable=SC2086
    [ -f "$samples" ] || "${SAMPLE[@]}" --model "$source_model" $MODEL_FLAGS --sampler ddpm \
      --steps "$steps" --cfg-scale 1.5 --classes "$CLASSES" --num-samples "$NUM_SAMPLES" \
      --batch-size "$BATCH" --seed 0 --dtype "$DTYPE" --out "$samples" --quiet
    versus=()
    [ "$name" = fp ] || versus=(--vs "$OUT/fp/samples_ddpm$steps.npz")
    [ -f "$dir/eval_ddpm$steps.json" ] || python -m ditq eval --samples "$samples" \
      --ref "$REF" "${versus[@]}" --inception-weights "$INCEPTION" --batch-size 500 --quiet \
      --out "$dir/eval_ddpm$steps.json"
  done
done <<< "$RUNS"

names=$(printf '%s\n' "$RUNS" | cut -d'|' -f1 | sed "s#^#$OUT/#" | tr '\n' ' ')
# shellcheck disable=SC2086
python -m ditq report $names --out "$OUT/report"

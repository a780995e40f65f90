#!/usr/bin/env bash
# One device lease for issue 17's PixArt speed rows: `ditq bench` on PixArt-Σ-shaped
# transformers (random weights, 300-token prompt table) at 1024 and 512 px, batch 1 and 8
# with guidance, next to the compiled BF16 model. The device image lacks diffusers: its
# wheel travels in .wheels/ (carry it) and is installed without dependencies.
#
#   stage start  install the wheel, start the bench detached under /tmp/dq
#   stage wait   sleep, then show progress
#   stage finish copy what was measured to $OUT
set -uo pipefail
stage=$1
D=/tmp/dq
export PYTHONPATH=$D/pylib:$PWD/src PYTHONUNBUFFERED=1
case $stage in
start)
  mkdir -p $D/bench
  python -m pip install -q --no-deps --target $D/pylib .wheels/diffusers-*.whl
  python -c "import torch, triton, diffusers; print(torch.__version__, triton.__version__, diffusers.__version__)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  for px in ${PIXELS:-1024 512}; do
    echo "python -m ditq bench --shapes PixArt-XL/2@$px --batches ${BATCHES:-1,8} \
      --variants ${VARIANTS:-bf16-compile,w8a8-static-symw,w8a8-fp8-static,w4a8} \
      --iters 20 --warmup 5 --steps 0 --out $D/bench/pixart$px"
  done > $D/bench/commands.sh
  cat $D/bench/commands.sh
  setsid nohup bash $D/bench/commands.sh > $D/bench/bench.log 2>&1 < /dev/null &
  sleep "${SLEEP:-60}"; tail -n 5 $D/bench/bench.log ;;
wait)
  sleep "${SLEEP:-300}"; tail -n 8 $D/bench/bench.log; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader ;;
finish)
  cp $D/bench/bench.log $D/bench/commands.sh $OUT/
  for d in $D/bench/pixart*; do [ -f $d/bench.json ] && cp $d/bench.json $OUT/$(basename $d).json && cp $d/bench.md $OUT/$(basename $d).md; done
  ls -la $OUT ;;
esac

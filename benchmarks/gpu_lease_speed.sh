#!/usr/bin/env bash
# One single-GPU lease for the timings that need no shipped data (random weights): issue 19's
# speed rows, issue 18's GPTQ calibration time of a DiT-XL/2-shaped model and issue 15's
# reconstruction step modes. Each stage fits one device call (run from the repository root;
# carry .wheels, which holds the torchao wheel, for `peers`); results land in $OUT.
#
#   stage check  benchmarks/kernels_check.py's attention rows (every path, and every tile
#                configuration of each), then in a second process its whole-model rows (the
#                real kernels against the simulated model; a fault in one part cannot end
#                the other)
#   stage b64    ditq bench of DiT-XL/2 256 px batch 64 without CUDA graphs (the host's share
#                of each call; the kernel profile): BF16 compiled against the 8-bit
#                formats, the fused quantized attention and PTQ4DiT's W4A8 layout, 50-step
#                sampling and the kernel profile
#   stage kcheck all of kernels_check.py (every format on DiT-XL/2-sized layers too)
#   stage peers  the same shape: torchao's FP8 row-wise and int8 dynamic configurations next
#                to BF16 compiled and ditq's two fastest W8A8 formats, in one process
#   stage targets issue 19's batch-64 targets: RUNS (default 3) processes, each BF16 compiled,
#                ditq's fastest W8A8 and W4A8 formats (FP8 activations) and torchao's FP8
#                row-wise and int8 dynamic configurations, every variant with CUDA graphs
#                and the compile scope of ditq sample --compile on a GPU (the whole call;
#                SCOPE=blocks for a graph per block); carry .wheels
#   stage targets512 the same at 512 px batch 16 (either of them with PROFILE=1: each variant's
#                kernel profile too, taken after its timed calls)
#   stage small  batch 1 and 16 at 256 px with CUDA graphs, every format profiled, for each
#                --compile-scope of SCOPES (default "model blocks": the whole call as one
#                graph, then each block a graph)
#   stage int4   the int4-weight formats at batch 1 and 64 with CUDA graphs, their int4
#                weights unpacked per call (the default), then in a second process read
#                packed by the GEMM (--int4-in-kernel), each next to BF16 compiled
#   stage host1  host_profile.py at batch 1 with CUDA graphs, the whole call one graph: what
#                the host does per call before the replay (latency - kernel time at batch 1)
#   stage graphs64 the b64 stage's variants with CUDA graphs (no host time in the call: is
#                a format's gap between kernel time and latency the CPU's?)
#   stage host   host_profile.py at batch 64: host against wall time per call (with the
#                garbage collector on and off) and a cProfile of the host's work
#   stage sample ditq sample --compile of the bundled model (RTN W8A8 static, real kernels)
#                at batch 16 with a CUDA graph per block (--compile-scope blocks), one per
#                call (the default) and without graphs: wall times (compilation included)
#                and each run's images against the first's
#   stage gemm   gemm_sweep.py at 32,768 tokens: the int8 GEMM in each tile configuration
#                of its sweep (BF16 beside it), then each layer's GEMM per format and kernel,
#                the quantize kernels and the block's norm + quantize (Triton norm_quantize
#                against compiled torch)
#   stage calib  PTQ4DiT W4A8's reconstruction with each --recon-compile mode of RECON_MODES
#                (default "on") and each --recon-tf32 of RECON_TF32 (default "true false"),
#                RECON_ITERS iterations per unit (default 300) on a
#                random testbed-shaped model; with GPTQ_XL=1 (measured once, RESULTS.md)
#                then gptq on a random DiT-XL/2 at 256 px (detached; the call waits for
#                it until it has run CALL_S seconds, default 560; CALIB_S bounds the
#                reconstruction timings)
#   stage poll   waits the same way for the gptq timing, then copies it to $OUT
#   stage solvers issue 18's comparison on one machine: gptq (W4A8) and PTQ4DiT W4A8 with
#                2,000 reconstruction iterations per unit on a random testbed-shaped model,
#                the GPU alone (calibration time does not depend on the weights' values)
#   stage gptqprof gptq alone on the same model, its steps timed (calibration_time.py
#                --breakdown: the driver's captures and forwards, GPTQ's Hessian passes,
#                stage discovery, column solves and error reports), then gptq_columns.py
#                (GPTQ's inner loop: the torch loop against the Triton kernel per layer shape)
#   stage detach runs the stages of STAGES (e.g. "targets small check") one after another in
#                a process that outlives the call (each stage's $OUT is /tmp/lease/STAGE, its
#                log /tmp/lease/STAGE.log; stage queue is that process), then collects
#                like `collect`
#   stage collect waits until the detached stages end or the call has run CALL_S seconds
#                (default 540), packing /tmp/lease into $OUT/lease.tar.gz every minute
#                meanwhile (a call cut short by the device's time limit still returns
#                what had run) and once more at the end, and prints
#                each stage's log's end (call it again and again until they end); a whole
#                lease: STAGES="small targets check targets512" BENCH_S=240 CHECK_S=280
#                bash benchmarks/gpu_lease_speed.sh detach, then collect (carry .wheels on
#                every call: a call without it removes it from the device's checkout)
# BENCH_S bounds each ditq bench (seconds); a bench rewrites its bench.json after every row,
# so a bench stopped by the bound keeps the rows it measured.
set -uo pipefail
stage=$1
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
XL=DiT-XL/2@256
wait_for() {  # PID_FILE, the default bound[, a command run every minute meanwhile]: until
  # that process ends or the call has run CALL_S seconds
  local next=0
  while kill -0 "$(cat "$1")" 2> /dev/null && [ $SECONDS -lt "${CALL_S:-$2}" ]; do
    if [ -n "${3:-}" ] && [ $SECONDS -ge $next ]; then "$3"; next=$((SECONDS + 60)); fi
    sleep 5
  done
}
gptq_wait() {  # the detached gptq timing
  wait_for /tmp/gptq_xl.pid 560
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
  tail -c 600 /tmp/gptq_xl.log | tr '\r' '\n' | grep . | tail -n 4
  cp /tmp/gptq_xl.json /tmp/gptq_xl.log "$OUT/" 2> /dev/null
}
kernels_check() {  # OUT_NAME, the default bound (CHECK_S), then kernels_check.py's options
  local name=$1 bound=$2; shift 2
  timeout "${CHECK_S:-$bound}" python benchmarks/kernels_check.py "$OUT/$name.json" "$@" \
    > "$OUT/$name.log" 2>&1
  echo "kernels_check rc=$?"; tail -n 150 "$OUT/$name.log" | grep -v '^{'
}
torchao() {  # the carried torchao wheel, importable from /tmp/site (installed once: a later
  # call of the lease that does not carry .wheels finds it removed from the checkout)
  [ -d /tmp/site/torchao ] || python -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --target /tmp/site .wheels/torchao-*.whl || return
  export PYTHONPATH=$PYTHONPATH:/tmp/site
}
bench() {  # OUT_NAME, then ditq bench's options (why a graph skips CUDA graphs: its log)
  local name=$1; shift
  TORCH_LOGS=cudagraphs timeout "${BENCH_S:-400}" python -m ditq bench --steps 50 "$@" \
    --out "$OUT/$name" 2> "$OUT/$name.stderr.log"
  cat "$OUT/$name/bench.md" 2> /dev/null
}
pack() { tar czf "$OUT/lease.tar.gz" -C /tmp lease; }
collect() {  # the detached queue of stages, packed into $OUT every minute while it runs, so
  # that a call stopped by the device's time limit before CALL_S still brings back what ran
  wait_for /tmp/lease/queue.pid 540 pack
  for log in /tmp/lease/*.log; do echo "== $log"; tail -c 2500 "$log"; done
  pack
}
case $stage in
detach)
  mkdir -p /tmp/lease
  setsid nohup bash "$0" queue > /dev/null 2>&1 < /dev/null &
  echo $! > /tmp/lease/queue.pid; collect ;;
queue)  # detach's process
  for s in $STAGES; do
    mkdir -p "/tmp/lease/$s"; echo "$s started after $SECONDS s" >> /tmp/lease/queue.log
    OUT=/tmp/lease/$s bash "$0" "$s" > "/tmp/lease/$s.log" 2>&1
  done
  echo "queue ended after $SECONDS s" >> /tmp/lease/queue.log ;;
collect)
  collect ;;
check)
  python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
  kernels_check kernels_check_attention 300 --only attention
  kernels_check kernels_check_model 240 --only model ;;
b64)
  bench b64 --shapes $XL --batches 64 --iters 30 --profile --no-cuda-graphs \
    --variants bf16-compile,w8a8-static-symw,w8a8-fp8-static,w8a8-attn8,w4a8-channel,w8a8-static,w4a8-fp8 ;;
kcheck)
  kernels_check kernels_check_all 540 ;;
peers)
  torchao || exit
  bench b64_peers --shapes $XL --batches 64 --iters 30 \
    --variants bf16-compile,torchao-fp8row,torchao-int8dyn,w8a8-fp8-static,w8a8-static-symw ;;
targets|targets512)
  torchao || exit
  shape=(--shapes $XL --batches 64 --iters 30)
  [ "$stage" = targets512 ] && shape=(--shapes DiT-XL/2@512 --batches 16 --iters 20)
  for run in $(seq "${RUNS:-3}"); do
    bench "${stage}_run$run" "${shape[@]}" --cuda-graphs ${PROFILE:+--profile} \
      ${SCOPE:+--compile-scope "$SCOPE"} \
      --variants bf16-compile,w8a8-fp8-static,w4a8-fp8,torchao-fp8row,torchao-int8dyn
  done ;;
small)
  small=(--shapes $XL --batches 1,16 --iters 30 --cuda-graphs --profile
    --variants bf16-compile,w8a8-fp8-static,w4a8-fp8,w8a8-static-symw,w4a8-channel,w8a8-static)
  for scope in ${SCOPES:-model blocks}; do
    bench "graphs_$scope" "${small[@]}" --compile-scope "$scope"
  done ;;
int4)
  int4=(--shapes $XL --batches 1,64 --iters 30 --cuda-graphs --profile
    --variants bf16-compile,w4a8-fp8,w4a8-channel)
  bench int4_unpacked "${int4[@]}"
  bench int4_in_kernel "${int4[@]}" --int4-in-kernel ;;
host1)
  timeout "${HOST_S:-400}" python benchmarks/host_profile.py "$OUT/host1.json" --batch 1 \
    --cuda-graphs --variants bf16-compile,w8a8-fp8-static,w4a8-fp8,w8a8-static-symw \
    | tee "$OUT/host1.log" ;;
graphs64)
  bench b64_graphs --shapes $XL --batches 64 --iters 30 --cuda-graphs \
    --variants bf16-compile,w8a8-static-symw,w8a8-fp8-static,w4a8-channel,w8a8-static,w4a8-fp8 ;;
host)
  timeout "${HOST_S:-400}" python benchmarks/host_profile.py "$OUT/host.json" --batch 64 \
    | tee "$OUT/host.log" ;;
sample)
  python -m ditq quantize --model src/ditq/assets/dit_demo_cifar10.safetensors --method rtn \
    --wbits 8 --abits 8 --device cuda --out /tmp/demo_w8a8 --quiet --overwrite || exit
  for run in "graphs-blocks --cuda-graphs --compile-scope blocks" \
      "graphs-model --cuda-graphs --compile-scope model" "no-graphs --no-cuda-graphs"; do
    set -- $run; name=$1; shift; start=$SECONDS
    python -m ditq sample --model /tmp/demo_w8a8 --device cuda --backend cuda --compile "$@" \
      --batch-size 16 --num-samples 256 --sampler ddim --steps 50 --seed 0 --dtype bf16 \
      --out "$OUT/sample_$name.npz" --quiet --overwrite
    echo "ditq sample $name: rc=$?, $((SECONDS - start)) s with the process's start"
  done
  python - "$OUT" <<'PY'
import sys, numpy as np
runs = {g: np.load(f"{sys.argv[1]}/sample_{g}.npz")["arr_0"].astype(float)
        for g in ("graphs-blocks", "graphs-model", "no-graphs")}
for name in ("graphs-model", "no-graphs"):
    a, b = runs["graphs-blocks"], runs[name]
    mse = ((a - b) ** 2).mean()
    print(f"graphs-blocks vs {name}: max |diff| {np.abs(a - b).max():.0f} levels, "
          f"PSNR {10 * np.log10(255 ** 2 / mse) if mse else float('inf'):.1f} dB")
PY
  ;;
gemm)  # the logs keep the rows of a run cut short
  timeout "${SWEEP_S:-200}" python benchmarks/gemm_sweep.py "$OUT/gemm_sweep.json" \
    --tokens 32768 --sweep --only "ditq int w8 sym,bf16" | tee "$OUT/gemm_sweep.log" | grep -v '^{'
  timeout "${GEMM_S:-300}" python benchmarks/gemm_sweep.py "$OUT/gemm.json" --tokens 32768 \
    | tee "$OUT/gemm.log" | grep -v '^{' ;;
calib)
  ptq4dit='ptq4dit:{"wbits": 4, "recon_iters": '${RECON_ITERS:-300}', "recon_compile": '
  methods=()
  for mode in ${RECON_MODES:-on}; do
    for tf32 in ${RECON_TF32:-true false}; do
      methods+=(--method "$ptq4dit\"$mode\", \"recon_tf32\": $tf32}")
    done
  done
  timeout "${CALIB_S:-300}" python benchmarks/calibration_time.py --shape testbed --quiet \
    "${methods[@]}" --out "$OUT/recon_modes.json"
  echo "recon modes rc=$? after ${SECONDS} s"; head -c 4000 "$OUT/recon_modes.json" 2> /dev/null
  [ "${GPTQ_XL:-0}" = 1 ] || exit 0
  setsid nohup python benchmarks/calibration_time.py --shape $XL --method gptq \
    --out /tmp/gptq_xl.json > /tmp/gptq_xl.log 2>&1 < /dev/null &
  echo $! > /tmp/gptq_xl.pid; gptq_wait ;;
poll)
  gptq_wait ;;
solvers)
  timeout "${CALIB_S:-540}" python benchmarks/calibration_time.py --shape testbed --quiet \
    --method gptq --method 'ptq4dit:{"wbits": 4, "recon_iters": 2000}' \
    --out "$OUT/solvers.json"
  echo "solvers rc=$?"; head -c 3000 "$OUT/solvers.json" 2> /dev/null ;;
gptqprof)
  timeout "${CALIB_S:-300}" python benchmarks/calibration_time.py --shape testbed --quiet \
    --method gptq --breakdown --out "$OUT/gptq_breakdown.json"
  echo "gptqprof rc=$?"
  timeout 200 python benchmarks/gptq_columns.py "$OUT/gptq_columns.json"; echo "columns rc=$?" ;;
*)
  echo "unknown stage $stage: detach, collect, queue, check, b64, kcheck, peers, targets, targets512, small, int4, host1, graphs64, host, sample, gemm, calib, poll, solvers or gptqprof"; exit 2 ;;
esac

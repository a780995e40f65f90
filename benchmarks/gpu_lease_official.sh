#!/usr/bin/env bash
# One single-GPU lease (nvidia-h200) for PTQ4DiT's official-default rows (fid_queue.py
# --plan official; PLAN=w4a4 GPUS=0,0,0,0,0 for issue 18's rows), in stages that each fit one
# device call. A call carries at most 64 MiB with the working tree (about 31 MB of tracked
# files), so the testbed checkpoint, the Inception weights and CIFAR-10 travel as one byte
# stream cut into 32 MiB parts, one part per call; jobs run detached under /tmp/dq.
#
#   stage bundle (here, not on the device) writes .carry/part.NN and .carry/manifest (each
#                file's name and size, in stream order: checkpoint, Inception, CIFAR-10)
#   stage ship   (carry .carry/manifest and one or more .carry/part.NN) keeps the parts and
#                puts together every file whose bytes have all arrived (two parts bring the
#                checkpoint, four the Inception weights, five CIFAR-10); its first call
#                copies the code
#   stage models (carry .carry4: RUN/ directories quantized in an earlier lease) puts them
#                in the queue's output so that they are sampled without calibrating again;
#                before start
#   stage start  (once the checkpoint is there) starts the queue: three workers on GPU 0
#                quantize and sample while the reference is missing; the jobs measured in an
#                earlier lease (benchmarks/results/*/RUN/eval_ddpmN.json) are skipped
#   stage ref    (once CIFAR-10 is there) reference statistics of CIFAR-10 train
#   stage wait   sleep SLEEP seconds (default 500), then show progress: keep SLEEP and anything
#                else in the same call under the call's time limit
#   stage bench  once the queue's jobs are done, the GPU alone: ditq bench of the fused
#                quantized attention (w8a8-attn8) against the same W8A8 with BF16 attention,
#                static FP8 (fp8_gemm with the fused MLP) and BF16 compiled, DiT-XL/2 256 px
#                batch 64, with the kernel profile; BENCH_ARGS replaces the shape, batch
#                and variant options, e.g. "--model $D/matrix/ptq4dit-official-w8a8 --batches
#                1000 --variants bf16-compile,quantized" (where the testbed's quantized
#                sampling step loses to FP)
#   stage finish evaluate what was sampled, write the report, copy the results to $OUT
#   stage pack   a resumable run's finished units and calibration set (RUN.resume/,
#                RUN.calib.safetensors; RUN default ptq4dit-official-w4a8-20k), or, once it is
#                quantized, its model directory (no samples), gzipped, as 16 MiB parts;
#                PARTS (default "00 01 02 03") of them to $OUT, four per call at most (the
#                64 MiB a call brings back); packed again when the run has finished more
#                units since the last call (PARTS from 00), so it may run while the run goes on
#   stage unpack before start, in the next lease: copies the parts carried in FROM (default
#                .carry5; two 16 MiB parts a call beside the tracked files);
#                LAST=1 on the call that carries the last ones unpacks them into the queue's
#                output, where the run resumes after its finished units (a packed model
#                directory is sampled without calibrating)
# TIMING=1 (issue 18): the first ship starts benchmarks/calibration_time.py on a random DiT-XL/2
# (gptq), start then times gptq on the testbed, and the queue's workers join only when
# both are done, so that the two times are measured with the GPU alone. KCHECK=1: start
# also runs benchmarks/kernels_check.py (real kernels against the simulated layers), detached
# next to the queue; KCHECK_ONLY=PART,PART: only its checks named so (e.g. codes).
# RECON_AB=ITERS: the first ship times PTQ4DiT W4A8 with ITERS reconstruction iterations per
# unit on a random testbed-shaped model, the GPU alone, with each --recon-compile mode of
# RECON_MODES (default "off on"; e.g. "on graphs").
# QFLAGS: appended to every quantize command of the queue (e.g. "--recon-compile off").
# A call's own command line must not contain what it pkills (pkill -f "ditq sample" in a
# command that also runs "ditq sample" kills the call itself): use the [d]itq pattern trick
# and no such text in the same command.
set -uo pipefail
stage=$1
D=/tmp/dq
PART_BYTES=33554432  # 32 MiB: one part and the tracked files fit a call's 64 MiB
export PYTHONPATH=$D/code/src PYTHONUNBUFFERED=1
progress() {
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  python - <<'PY'
import json, pathlib
p = pathlib.Path("/tmp/dq/matrix/status.json")
for k, v in (json.loads(p.read_text()) if p.exists() else {}).items():
    print(f"{k:45s} rc={v['rc']} {v['seconds']:7.1f} s")
PY
  tail -n 2 $D/queue.log
  for log in $D/matrix/logs/*.sample.log; do  # the progress bar of each sampling job
    [ -f "$log" ] && echo "$(basename $log): $(tail -c 400 $log | tr '\r' '\n' | grep . | tail -n 1)"
  done
}
queue() {  # jobs whose eval JSON an earlier lease left in benchmarks/results are skipped
  local done=(); for dir in $D/code/benchmarks/results/*/; do done+=(--results $dir); done
  setsid nohup python $D/code/benchmarks/fid_queue.py --model $D/dit_s2_cifar10.pt \
    --out $D/matrix --gpus ${QUEUE_GPUS:-${GPUS:-0,0,0}} --plan ${PLAN:-official} --ref $D/ref.npz --inception $D/inception.pth \
    --steps "${STEPS:-50,250}" --quantize-flags "${QFLAGS:-}" "${done[@]}" "$@" \
    >> $D/queue.log 2>&1 < /dev/null &
}
case $stage in
bundle)
  mkdir -p .carry && rm -f .carry/part.* .carry/manifest
  files=(../shared/models/dit_s2_cifar10.pt ../shared/fid/pt_inception-2015-12-05-fp16.pth
         ../shared/data/cifar_train.npz)
  for name in dit_s2_cifar10.pt inception.pth cifar_train.npz; do echo $name; done \
    | paste - <(stat -c %s "${files[@]}") > .carry/manifest
  cat "${files[@]}" | split -b $PART_BYTES -d - .carry/part.
  cat .carry/manifest; ls .carry; sha256sum "${files[@]}" ;;
ship)
  if [ ! -d $D/code ]; then
    mkdir -p $D/code && cp -r src benchmarks $D/code/
    python -c "import torch, triton; print(torch.__version__, triton.__version__)"
    if [ -n "${RECON_AB:-}" ]; then  # reconstruction step modes (--recon-compile), the GPU alone
      ptq4dit='ptq4dit:{"wbits": 4, "recon_iters": '$RECON_AB', "recon_compile": '
      methods=(); for mode in ${RECON_MODES:-off on}; do methods+=(--method "$ptq4dit\"$mode\"}"); done
      python $D/code/benchmarks/calibration_time.py --shape testbed --quiet "${methods[@]}" \
        --out $D/timing_recon_ab.json
    fi
    if [ "${TIMING:-0}" = 1 ]; then
      setsid nohup python $D/code/benchmarks/calibration_time.py --shape DiT-XL/2@256 \
        --method gptq --out $D/timing_xl.json > $D/timing.log 2>&1 < /dev/null &
      echo $! > $D/timing_xl.pid
    fi
  fi
  mkdir -p $D/parts && cp .carry/part.* .carry/manifest $D/parts/
  arrived=0; for part in $D/parts/part.*; do  # the bytes of the parts that follow on from part.00
    [ "$(basename $part)" = "part.$(printf %02d $((arrived / PART_BYTES)))" ] || break
    arrived=$((arrived + $(stat -c %s $part)))
  done
  offset=0; while read -r name size; do
    if [ ! -f $D/$name ] && [ $((offset + size)) -le $arrived ]; then
      (set +o pipefail; cat $D/parts/part.* | tail -c +$((offset + 1)) | head -c $size > $D/$name.tmp)
      [ "$(stat -c %s $D/$name.tmp)" = $size ] && mv $D/$name.tmp $D/$name && sha256sum $D/$name
    fi
    offset=$((offset + size))
  done < $D/parts/manifest
  echo "$arrived bytes arrived"; ls -la $D ;;
start)
  [ -f $D/dit_s2_cifar10.pt ] || { echo "ship the checkpoint's parts first"; exit 2; }
  if [ "${TIMING:-0}" = 1 ]; then
    setsid nohup bash -c "while kill -0 $(cat $D/timing_xl.pid) 2> /dev/null; do sleep 2; done
      python $D/code/benchmarks/calibration_time.py --model $D/dit_s2_cifar10.pt --method gptq \
        --out $D/timing_s2.json >> $D/timing.log 2>&1; touch $D/timing.done" \
      > /dev/null 2>&1 < /dev/null &
    QUEUE_GPUS=$(echo "${GPUS:-0,0,0}" | sed "s|\([0-9]\)|\1:$D/timing.done|g")
  fi
  queue
  if [ "${KCHECK:-0}" = 1 ]; then  # the real kernels against the simulated layers
    setsid nohup python $D/code/benchmarks/kernels_check.py $D/kernels_check.json \
      ${KCHECK_ONLY:+--only $KCHECK_ONLY} > $D/kernels_check.log 2>&1 < /dev/null &
  fi
  sleep "${SLEEP:-30}"; progress; cat $D/timing.log 2>/dev/null | tail -n 5 ;;
models)
  mkdir -p $D/matrix && cp -r .carry4/* $D/matrix/ && ls -la $D/matrix/* ;;
ref)
  [ -f $D/cifar_train.npz ] && [ -f $D/inception.pth ] || { echo "ship all five parts first"; exit 2; }
  python -m ditq eval --build-ref $D/cifar_train.npz --inception-weights $D/inception.pth \
    --out $D/ref.npz --device cuda --batch-size 500 --quiet
  ls -la $D; progress ;;
wait)
  [ "${SLEEP:-500}" -le 540 ] || { echo "SLEEP=${SLEEP} leaves no time in a 600 s call"; exit 2; }
  sleep "${SLEEP:-500}"; progress; tail -n 3 $D/timing.log $D/kernels_check.log 2>/dev/null ;;
bench)
  pgrep -f "[f]id_queue.py|[k]ernels_check.py" > /dev/null && { echo "GPU busy: not timed"; progress; exit 1; }
  variants=bf16-compile,w8a8-static-symw,w8a8-attn8,w8a8-fp8-static
  timeout "${BENCH_S:-400}" python -m ditq bench --steps 0 --iters 30 --profile \
    ${BENCH_ARGS:---shapes DiT-XL/2@256 --batches 64 --variants $variants} --out $D/bench_attn
  cp $D/bench_attn/bench.json $OUT/bench_attn.json; cat $D/bench_attn/bench.md ;;
finish)
  pkill -f fid_queue.py; pkill -f "ditq sample"; sleep 2
  # an evaluation the queue had started finishes first (a second one would find its --out
  # taken and record a failure over the first one's result)
  while pgrep -f "[d]itq eval" > /dev/null; do sleep 5; done
  python $D/code/benchmarks/fid_queue.py --model $D/dit_s2_cifar10.pt --out $D/matrix \
    --gpus ${GPUS:-0,0,0} --plan ${PLAN:-official} --ref $D/ref.npz --inception $D/inception.pth --eval-only \
    --steps "${STEPS:-50,250}" \
    >> $D/queue.log 2>&1
  progress
  # a resumable run's .resume directory of unit checkpoints is no run to report
  cd $D/matrix && runs=$(ls -d */ | tr -d / | grep -v -e '^logs$' -e '^report$' -e '\.resume$') && \
    python -m ditq report $runs --out $D/matrix/report > $D/report.log 2>&1
  cp $D/timing* $D/bench_attn/bench.json $D/kernels_check.json $D/kernels_check.log $OUT/ 2>/dev/null
  tar czf $OUT/matrix_official.tgz --exclude='*.npz' --exclude='*.safetensors' \
    --exclude='*.resume' -C $D matrix queue.log
  cat $D/report.log | head -n 40 ;;
pack)
  run=${RUN:-ptq4dit-official-w4a8-20k}
  # packed again when the run has finished units (or its calibration) since the last pack;
  # a call for later parts only (PARTS without 00) keeps the pack its first call made
  state=$(ls -l --time-style=+%s $D/matrix/$run.resume $D/matrix/$run/ditq.json 2> /dev/null | md5sum)
  parts=${PARTS:-00 01 02 03}
  if [ "$(cat $D/resume.parts.done 2> /dev/null)" != "$state" ] \
    && { [ "${parts#00}" != "$parts" ] || [ ! -f $D/resume.parts.done ]; }; then
    rm -f $D/resume.part.*
    # gzip: the finished units' fp32 weights are grid values, a few per channel (about 3x)
    what="$run.resume $run.calib.safetensors"  # unfinished: resume from the finished units
    [ -f $D/matrix/$run/ditq.json ] && what=$run  # quantized: the model directory, no samples
    tar cf - -C $D/matrix --exclude='*.npz' $what | gzip -1 \
      | split -b 16M -d - $D/resume.part.
    echo "$state" > $D/resume.parts.done
  fi
  ls -la $D/resume.part.* $D/matrix/$run*
  for part in $parts; do [ ! -f $D/resume.part.$part ] || cp $D/resume.part.$part $OUT/; done ;;
unpack)
  mkdir -p $D/matrix $D/parts && cp ${FROM:-.carry5}/resume.part.* $D/parts/ && ls -la $D/parts
  if [ "${LAST:-0}" = 1 ]; then
    cat $D/parts/resume.part.* | gzip -d | tar xf - -C $D/matrix && ls -la $D/matrix
  fi ;;
esac

#!/usr/bin/env bash
# One GPU lease (nvidia-h200-x4) for the quality matrix and the kernel profile, in stages
# that each fit one device call (64 MiB carried per call: the testbed checkpoint travels in
# two parts). Long jobs run detached (setsid) under /tmp/dq and survive between calls while
# the machine is held.
#
#   stage prof   (carry .carry: ckpt.part.aa) gemm_sweep.py and ditq bench --profile on GPU 3
#   stage start  (carry .carry3: ckpt.part.ab + cifar_train.npz) the matrix queue on GPUs
#                0-2 (GPU 3 joins after the profile), only the jobs that
#                benchmarks/results/matrix_testbed_h200 lacks
#   stage ref    (carry .carry2: Inception weights) reference statistics of CIFAR-10 train
#   stage wait   sleep, then show progress (and copy the profile results to $OUT, once)
#   stage finish evaluate what was sampled, write the report, copy results to $OUT
#   stage kernels (carry .whl for the kernels stages: the torchao wheel, see the device
#                README) the issue-7 tables, one job per GPU: batch 64 (profiled), torchao
#                peers, batch 1/16 with and without CUDA graphs (DiT-XL/2 256/512, testbed)
#   stage kernels2 the int8 GEMM: tile sweep at 32,768 tokens, kernel check, demo + backend
#                agreement; batch 64 with and without --fuse-mlp
#   stage kcollect copy a suite's results to $OUT (K=k2: stage kernels2's)
set -uo pipefail
stage=$1
D=/tmp/dq
export PYTHONPATH=$D/code/src PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
queue() {
  setsid nohup python $D/code/benchmarks/fid_queue.py --model $D/dit_s2_cifar10.pt \
    --out $D/matrix --gpus "$1" --ref $D/ref.npz --inception $D/inception.pth "${@:2}" \
    >> $D/queue.log 2>&1 < /dev/null &
}
suite() {  # a kernel suite: fresh code copy in $D/code_$1, results in $K=$D/$1, torchao
  K=$D/$1                  # from the carried wheel, job GPU "command" NAME (NAME.log/.done)
  rm -rf $D/code_$1 $K && mkdir -p $D/code_$1 $K && cp -r src benchmarks $D/code_$1/
  python3 -m pip install -q --no-index --no-deps --no-compile --target $D/site .whl/*.whl
  export PYTHONPATH=$D/code_$1/src:$D/site
  cd $D/code_$1
  B="python -m ditq bench --iters 10 --warmup 3 --steps 50"
}
job() { CUDA_VISIBLE_DEVICES=$1 setsid nohup bash -c "$2; touch $K/$3.done" > $K/$3.log 2>&1 < /dev/null & }
progress() {
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
  python - <<'EOF'
import json, pathlib
p = pathlib.Path("/tmp/dq/matrix/status.json")
for k, v in (json.loads(p.read_text()) if p.exists() else {}).items():
    print(f"{k:45s} rc={v['rc']} {v['seconds']:7.1f} s gpu {v['gpu']}")
EOF
  tail -n 3 $D/train.log 2>/dev/null; ls $D/*.done 2>/dev/null
}
case $stage in
prof)
  mkdir -p $D/bench && cp .carry/ckpt.part.aa $D/ && rm -rf $D/code && mkdir $D/code && cp -r src benchmarks scripts $D/code/
  python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())"
  cd $D/code && CUDA_VISIBLE_DEVICES=3 setsid nohup bash -c "timeout 300 python benchmarks/gemm_sweep.py $D/bench/gemm_sweep.json > $D/bench/gemm_sweep.log 2>&1; timeout 420 python -m ditq bench --shapes DiT-XL/2@256 --batches 64 --variants bf16-compile,w8a8-static,w8a8-dynamic,w8a8-fp8,w4a8 --iters 10 --warmup 3 --steps 0 --profile --out $D/bench/profile > $D/bench/profile.log 2>&1; touch $D/prof.done" > /dev/null 2>&1 < /dev/null &
  sleep 5; ls $D ;;
start)
  cat $D/ckpt.part.aa .carry3/ckpt.part.ab > $D/dit_s2_cifar10.pt && cp .carry3/cifar_train.npz $D/
  ls -la $D
  queue 0,1,2,3:$D/prof.done --results $D/code/benchmarks/results/matrix_testbed_h200
  sleep "${SLEEP:-45}"; progress ;;
ref)
  cp .carry2/pt_inception-2015-12-05-fp16.pth $D/inception.pth
  CUDA_VISIBLE_DEVICES=0 python -m ditq eval --build-ref $D/cifar_train.npz --inception-weights \
    $D/inception.pth --out $D/ref.npz --device cuda --batch-size 500 --quiet
  sleep "${SLEEP:-0}"; progress ;;
wait)
  sleep "${SLEEP:-500}"; progress
  tail -n 2 $D/bench/*.log 2>/dev/null; ls $D/k $D/k2 2>/dev/null
  [ -f $D/prof.done ] && [ ! -f $D/prof.copied ] && touch $D/prof.copied && \
    cp $D/bench/gemm_sweep.json $D/bench/gemm_sweep.log $D/bench/profile/bench.* $OUT/
  ;;
kernels2)
  suite k2
  B="$B --shapes DiT-XL/2@256 --batches 64 --profile"
  V=bf16-compile,w8a8-static,w8a8-static-symw,w8a8-fp8-static,w4a8-channel,w4a8-all
  job 0 "timeout 480 python benchmarks/gemm_sweep.py $K/sweep.json --sweep --tokens 32768" sweep
  job 1 "$B --variants $V --no-fuse-mlp --out $K/b64" b64
  job 2 "$B --variants $V --fuse-mlp --out $K/b64_fused" b64_fused
  job 3 "timeout 300 python benchmarks/kernels_check.py $K/kernels_check.json; timeout 200 python benchmarks/gemm_sweep.py $K/gemm.json --tokens 32768,8192,512; python -m ditq demo --device cuda --out $K/demo > $K/demo.log 2>&1; python benchmarks/backend_agreement.py $K/demo $K/backend_agreement.json --device cuda" check
  sleep "${SLEEP:-30}"; ls $K ;;
kernels)
  suite k
  V64=bf16-compile,w8a8-static,w8a8-static-symw,w8a8-fp8-static,w8a8-fp8,w8a8-dynamic,w4a8,w4a8-channel,w4a8-all,w4a16
  V16=bf16-compile,w8a8-static,w8a8-static-symw,w8a8-fp8-static,w4a8-channel
  S="--shapes DiT-XL/2@256,DiT-XL/2@512,testbed --batches 1,16 --variants $V16"
  job 0 "$B --shapes DiT-XL/2@256 --batches 64 --variants $V64 --profile --out $K/b64" b64
  job 1 "$B --shapes DiT-XL/2@256 --batches 64 --variants bf16-compile,torchao-int8dyn,torchao-fp8row,w8a8-fp8-static --out $K/b64_torchao" torchao
  job 2 "$B $S --cuda-graphs --out $K/small_graphs" graphs
  job 3 "$B $S --out $K/small" small
  sleep "${SLEEP:-10}"; ls $K ;;
kcollect)
  K=${K:-k}; ls $D/$K; tail -n 3 $D/$K/*.log | cut -c1-300
  cd $D/$K && for f in */bench.md; do cp $f $OUT/$(dirname $f).md; done
  tar czf $OUT/kernels_suite${K#k}.tgz --exclude='demo' -C $D $K ;;
finish)
  pkill -f fid_queue.py; pkill -f "ditq sample"; sleep 2
  python $D/code/benchmarks/fid_queue.py --model $D/dit_s2_cifar10.pt --out $D/matrix \
    --gpus 0,1,2,3 --ref $D/ref.npz --inception $D/inception.pth --eval-only \
    --results $D/code/benchmarks/results/matrix_testbed_h200 >> $D/queue.log 2>&1
  progress
  cd $D/matrix && runs=$(ls -d */ | grep -v -e logs -e report | tr -d /) && \
    python -m ditq report $runs --out $D/matrix/report > $D/report.log 2>&1
  tar czf $OUT/matrix.tgz --exclude='*.npz' --exclude='*.safetensors' -C $D matrix queue.log
  cat $D/report.log | head -n 60 ;;
esac

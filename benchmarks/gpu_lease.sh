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
#   stage kernels (carry .whl: the torchao wheel, see the device README) the issue-7 suite,
#                one job per GPU: kernel check, GEMM timings, batch 1/16 fused with CUDA
#                graphs; bench at batch 64 (profiled, torchao peers included); the same
#                with --fuse-mlp; batch 1/16 with and without --fuse-mlp, testbed shape
#                included
#   stage kcollect copy the suite's results to $OUT (K=k2: stage kernels2's)
#   stage kernels3 (carry .whl) the final tables: batch 64 (profiled), torchao peers, batch
#                1/16 with and without CUDA graphs, XL 256/512 and testbed
#   stage kernels2 the persistent / TMA int8 GEMM: tile sweep at 32,768 tokens, kernel
#                check, demo + backend agreement; batch 64 with and without --fuse-mlp
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
kernels)
  rm -rf $D/code $D/k && mkdir -p $D/code $D/k && cp -r src benchmarks $D/code/
  python3 -m pip install -q --no-index --no-deps --no-compile --target $D/site .whl/*.whl
  export PYTHONPATH=$D/code/src:$D/site
  cd $D/code
  B="python -m ditq bench --iters 10 --warmup 3 --steps 50"
  V64=bf16-compile,w8a8-static,w8a8-static-symw,w8a8-fp8-static,w8a8-fp8,w8a8-dynamic,w4a8,w4a8-channel,w4a8-all,w4a16,torchao-int8dyn,torchao-fp8row
  VF=bf16-compile,w8a8-static,w8a8-static-symw,w4a8,w4a8-channel,w4a8-all
  V16=bf16-compile,w8a8-static-symw,w8a8-fp8-static,w4a8-channel
  S="--shapes DiT-XL/2@256,DiT-XL/2@512,testbed --batches 1,16 --variants $V16"
  job() { CUDA_VISIBLE_DEVICES=$1 setsid nohup bash -c "$2; touch $D/k/$3.done" > $D/k/$3.log 2>&1 < /dev/null & }
  job 0 "timeout 300 python benchmarks/kernels_check.py $D/k/kernels_check.json; timeout 200 python benchmarks/gemm_sweep.py $D/k/gemm.json; $B --shapes DiT-XL/2@256,testbed --batches 1,16 --variants $V16 --fuse-mlp --cuda-graphs --out $D/k/small_graphs" check
  job 1 "$B --shapes DiT-XL/2@256 --batches 64 --variants $V64 --profile --out $D/k/b64" b64
  job 2 "$B --shapes DiT-XL/2@256 --batches 64 --variants $VF --profile --fuse-mlp --out $D/k/b64_fused" b64_fused
  job 3 "$B $S --out $D/k/small; $B $S --fuse-mlp --out $D/k/small_fused" small
  sleep "${SLEEP:-30}"; ls $D/k; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader ;;
kernels2)
  rm -rf $D/code2 $D/k2 && mkdir -p $D/code2 $D/k2 && cp -r src benchmarks $D/code2/
  export PYTHONPATH=$D/code2/src:$D/site
  cd $D/code2
  B="python -m ditq bench --iters 10 --warmup 3 --steps 50 --shapes DiT-XL/2@256 --batches 64 --profile"
  V=bf16-compile,w8a8-static,w8a8-static-symw,w8a8-fp8-static,w4a8-channel,w4a8-all
  job() { CUDA_VISIBLE_DEVICES=$1 setsid nohup bash -c "$2; touch $D/k2/$3.done" > $D/k2/$3.log 2>&1 < /dev/null & }
  job 0 "timeout 480 python benchmarks/gemm_sweep.py $D/k2/sweep.json --sweep --tokens 32768" sweep
  job 1 "$B --variants $V --out $D/k2/b64" b64
  job 2 "$B --variants $V --fuse-mlp --out $D/k2/b64_fused" b64_fused
  job 3 "timeout 300 python benchmarks/kernels_check.py $D/k2/kernels_check.json; timeout 200 python benchmarks/gemm_sweep.py $D/k2/gemm.json --tokens 32768,8192,512; python -m ditq demo --device cuda --out $D/k2/demo > $D/k2/demo.log 2>&1; python benchmarks/backend_agreement.py $D/k2/demo $D/k2/backend_agreement.json --device cuda" check
  sleep "${SLEEP:-30}"; ls $D/k2; nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader ;;
kernels3)
  rm -rf $D/code3 $D/k3 && mkdir -p $D/code3 $D/k3 && cp -r src benchmarks $D/code3/
  python3 -m pip install -q --no-index --no-deps --no-compile --target $D/site .whl/*.whl
  export PYTHONPATH=$D/code3/src:$D/site
  cd $D/code3
  B="python -m ditq bench --iters 10 --warmup 3 --steps 50"
  V64=bf16-compile,w8a8-static,w8a8-static-symw,w8a8-fp8-static,w8a8-fp8,w8a8-dynamic,w4a8,w4a8-channel,w4a8-all,w4a16
  V16=bf16-compile,w8a8-static,w8a8-static-symw,w8a8-fp8-static,w4a8-channel
  S="--shapes DiT-XL/2@256,DiT-XL/2@512,testbed --batches 1,16 --variants $V16"
  job() { CUDA_VISIBLE_DEVICES=$1 setsid nohup bash -c "$2; touch $D/k3/$3.done" > $D/k3/$3.log 2>&1 < /dev/null & }
  job 0 "$B --shapes DiT-XL/2@256 --batches 64 --variants $V64 --profile --out $D/k3/b64" b64
  job 1 "$B --shapes DiT-XL/2@256 --batches 64 --variants bf16-compile,torchao-int8dyn,torchao-fp8row,w8a8-fp8-static --out $D/k3/b64_torchao" torchao
  job 2 "$B $S --cuda-graphs --out $D/k3/small_graphs" graphs
  job 3 "$B $S --out $D/k3/small" small
  sleep "${SLEEP:-10}"; ls $D/k3 ;;
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

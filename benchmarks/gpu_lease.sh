#!/usr/bin/env bash
# One GPU lease (nvidia-h200-x4) for the quality matrix, the kernel check and bench, and the
# bundled model's training, in stages that each fit one 10-minute device call. Long jobs
# run detached (setsid) under /tmp/dq and survive between calls while the machine is held.
#
#   stage start  (carry .carry: checkpoint + code snapshot .carry/snap = git archive HEAD)
#                queue on GPUs 0-2; kernels_check.py and ditq bench on GPU 3
#   stage train  (carry .carry3: cifar_train.npz) train the demo model on GPU 3
#   stage ref    (carry .carry2: Inception weights) reference statistics of CIFAR-10 train
#   stage wait   sleep, then show progress
#   stage finish evaluate what was sampled, write the report, copy results to $OUT
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
  tail -n 3 $D/train.log 2>/dev/null
}
case $stage in
start)
  mkdir -p $D && cp .carry/dit_s2_cifar10.pt $D/ && rm -rf $D/code && cp -r .carry/snap $D/code
  python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())"
  queue 0,1,2
  cd $D/code
  CUDA_VISIBLE_DEVICES=3 timeout 220 python benchmarks/kernels_check.py $OUT/kernels_check.json 2>&1 | tail -n 60
  CUDA_VISIBLE_DEVICES=3 timeout 240 python -m ditq bench --shapes DiT-XL/2@256 --batches 64 \
    --variants bf16,bf16-compile,w8a8-static,w8a8-dynamic,w8a8-fp8,w4a8,w4a16 \
    --iters 20 --warmup 5 --steps 50 --out $OUT/bench 2>&1 | tail -n 30
  progress ;;
train)
  cp .carry3/cifar_train.npz $D/
  cd $D/code
  CUDA_VISIBLE_DEVICES=3 setsid nohup python scripts/train_demo_model.py --data $D/cifar_train.npz \
    --out $D/dit_demo_cifar10.safetensors --minutes "${MINUTES:-8}" > $D/train.log 2>&1 < /dev/null &
  sleep "${SLEEP:-60}"; progress ;;
ref)
  cp .carry2/pt_inception-2015-12-05-fp16.pth $D/inception.pth
  CUDA_VISIBLE_DEVICES=3 python -m ditq eval --build-ref $D/cifar_train.npz --inception-weights \
    $D/inception.pth --out $D/ref.npz --device cuda --batch-size 500 --quiet
  sleep "${SLEEP:-0}"; progress ;;
wait)
  sleep "${SLEEP:-500}"; progress ;;
finish)
  pkill -f fid_queue.py; pkill -f "ditq sample"; sleep 2
  python $D/code/benchmarks/fid_queue.py --model $D/dit_s2_cifar10.pt --out $D/matrix \
    --gpus 0,1,2,3 --ref $D/ref.npz --inception $D/inception.pth --eval-only >> $D/queue.log 2>&1
  progress
  cd $D/matrix && runs=$(ls -d */ | grep -v logs | tr -d /) && \
    python -m ditq report $runs --out $D/matrix/report > $D/report.log 2>&1
  tar czf $OUT/matrix.tgz --exclude='*.npz' --exclude='*.safetensors' -C $D matrix queue.log
  [ -f $D/dit_demo_cifar10.safetensors ] && split -b 15000000 $D/dit_demo_cifar10.safetensors $OUT/demo_model.part.
  cp $D/train.log $OUT/ 2>/dev/null
  cat $D/report.log | head -n 60 ;;
esac

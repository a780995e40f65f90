#!/usr/bin/env bash
# CPU contention: one `ditq quantize` alone, then two at once on the same cores, with the
# OpenMP spin count ditq sets (GOMP_SPINCOUNT=10000, ditq/__init__.py) and with libgomp's
# default (300000). Usage: bash benchmarks/cpu_contention.sh [WORKDIR]
set -euo pipefail
work=${1:-$(mktemp -d)}
mkdir -p "$work" && cd "$work"
quantize() {
    ditq quantize --model demo --method ptq4dit --calib-preset cpu --recon-iters 0 \
        --out "$1" --quiet --overwrite | tail -1
}
for spin in 10000 300000; do
    export GOMP_SPINCOUNT=$spin
    echo "GOMP_SPINCOUNT=$spin, alone:"
    quantize solo
    echo "GOMP_SPINCOUNT=$spin, two at once:"
    quantize a & quantize b
    wait
done

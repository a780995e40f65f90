python -m ditq bench --shapes PixArt-XL/2@1024 --batches 1,8       --variants bf16-compile,w8a8-static-symw,w8a8-fp8-static,w4a8       --iters 20 --warmup 5 --steps 0 --out /tmp/dq/bench/pixart1024
python -m ditq bench --shapes PixArt-XL/2@512 --batches 1,8       --variants bf16-compile,w8a8-static-symw,w8a8-fp8-static,w4a8       --iters 20 --warmup 5 --steps 0 --out /tmp/dq/bench/pixart512

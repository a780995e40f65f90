"""The FID matrix (PROTOCOL.md, "Quality") as a prioritized job queue over several GPUs.

    python benchmarks/fid_queue.py --model dit_s2_cifar10.pt --out /tmp/matrix --gpus 0,1,2 \
        [--ref cifar_train_stats.npz --inception pt_inception-2015-12-05-fp16.pth] [--plan P]

One worker thread per GPU takes the highest-priority runnable job: quantize a run (once),
sample it at one sampler setting (10,000 samples, cfg 1.5, seed 0, bf16, same noise for
every model), evaluate the samples (when the reference statistics and Inception weights
exist: ``ditq eval`` with FID, sFID, Precision/Recall and PSNR/SSIM against the FP run's
samples; ``--eval-only`` evaluates what was sampled before the statistics existed).
Every step is skipped when its output exists, so the queue can be stopped and started
again, and ``--results DIR`` (repeatable) drops the jobs whose ``eval_ddpmN.json`` an
earlier lease left in DIR; ``status.json`` records each job's command, wall time and
outcome, and the logs are in ``OUT/logs`` (sampling's with its per-batch progress bar).
Sampling is tried with ``--compile`` (CUDA graphs on a GPU) first, then compiled without
CUDA graphs, then eagerly; a job on the real kernels (``--backend cuda``) that fails all
three fails (not moved to the simulated model, whose DDPM 250 samples would hold the GPU
past a lease's end).
Plans (``--plan``): ``headline`` (PTQ4DiT, DiTAS, single-step at W8A8/W4A8, DDPM
50/250/100), ``ablation`` (PTQ4DiT balancing with and without reconstruction, DDPM 50),
``official`` (PTQ4DiT's official defaults at W8A8/W4A8 and the block-only coverage with
the percentile search, DDPM 50/250), ``w4a4``, ``w4a4-more`` and ``w4a4-250`` (issue 18:
W4A4 and GPTQ; ``w4a4-250`` samples on the real kernels, ``--backend cuda``;
``w4a4-baselines``: PTQ4DiT and DiTAS at W4A4, DDPM 50; ``w4a4-asym``: SVDQuant with
asymmetric activation groups),
``official-250`` (issue 15: the DDPM 250 rows of ``official`` on the real kernels, and the
block-only W8A8 percentile row at DDPM 50, simulated like its DDPM 50 neighbours),
``official-keep-patch`` (the official coverage with the patch embedding in float, DDPM
50), ``official-20k`` (PTQ4DiT W4A8 with no flag but the bits: 20,000 iterations per unit;
DDPM 50 simulated, DDPM 250 on the real kernels), ``fast-formats`` (issue 19: the fastest
formats' FID, DDPM 250 on the real kernels).
``--gpus 0,0,0`` runs three workers on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

RECON_ITERS = 2000
"""PTQ4DiT reconstruction iterations per block in these runs (official: 20,000; the GPU
lease of a session cannot hold 12 blocks x 20k iterations next to the sampling)."""
FP_PSNR_SAMPLES = 1000
"""The FP run samples this many (the same first seeds) as the PSNR/SSIM reference; its FID
at 10,000 samples was measured separately (RESULTS.md)."""

HEADLINE = {
    "ptq4dit-w8a8": f"--method ptq4dit --wbits 8 --abits 8 --recon-iters {RECON_ITERS}",
    "ptq4dit-w4a8": f"--method ptq4dit --wbits 4 --abits 8 --recon-iters {RECON_ITERS}",
    "ditas-w8a8": "--method ditas --wbits 8 --abits 8",
    "ditas-w4a8": "--method ditas --wbits 4 --abits 8",
    "single-step-w8a8": "--method single-step --wbits 8 --abits 8",
    "single-step-w4a8": "--method single-step --wbits 4 --abits 8",
}
ABLATION = {
    f"ptq4dit-w4a8-{balance.replace('+', '')}-{'recon' if iters else 'norecon'}": (
        f"--method ptq4dit --wbits 4 --abits 8 --balance {balance} --recon-iters {iters}"
    )
    for balance in ("none", "csb", "csb+ssc")
    for iters in (0, RECON_ITERS)
    if not (balance == "csb+ssc" and iters)  # that one is the headline ptq4dit-w4a8
}
OFFICIAL = {
    "ptq4dit-official-w8a8": f"--method ptq4dit --wbits 8 --abits 8 --recon-iters {RECON_ITERS}",
    "ptq4dit-official-w4a8": f"--method ptq4dit --wbits 4 --abits 8 --recon-iters {RECON_ITERS}",
    "ptq4dit-blocks-pct-w4a8": (
        f"--method ptq4dit --wbits 4 --abits 8 --layers blocks --recon-iters {RECON_ITERS}"
    ),
    "ptq4dit-blocks-pct-w8a8": (
        f"--method ptq4dit --wbits 8 --abits 8 --layers blocks --recon-iters {RECON_ITERS}"
    ),
}
"""PTQ4DiT with the official defaults of issue 15 (every linear and the patch embedding,
best-of-percentiles ranges, steps 0..240, paired classes, 10-chunk reconstruction), and the
block-only coverage with the percentile search, to separate the two changes."""

OFFICIAL_KEEP_PATCH = {
    f"ptq4dit-official-keep-patch-{bits}": (
        f"{OFFICIAL[f'ptq4dit-official-{bits}']} --keep-float x_embedder.proj"
    )
    for bits in ("w8a8", "w4a8")
}
"""``--plan official-keep-patch``: the official coverage with the patch embedding in float,
DDPM 50: whether the patch embedding's 8-bit input (the pixels x_t) is the official
coverage's whole loss, as the CPU diagnostic of the output error says (RESULTS.md)."""
OFFICIAL_20K = "--method ptq4dit --wbits 4 --abits 8"
"""PTQ4DiT W4A8 with every default official, the 20,000 reconstruction iterations per unit
included."""

GROUPS64 = "--w-group-size 64 --a-dynamic --a-granularity group --a-group-size 64"
W4A4 = {
    "rtn-w4a4": "--method rtn --wbits 4 --abits 4",
    "gptq-w4a4": f"--method gptq --wbits 4 --abits 4 {GROUPS64}",
    "svdquant-w4a4": "--method svdquant",
    "svdquant-gptq-rotate-w4a4": "--method svdquant --weight-solver gptq --rotate",
    "gptq-w4a8": "--method gptq",
}
"""Issue 18: W4A4 with RTN (today's baseline), GPTQ with SVDQuant's activation groups,
SVDQuant, SVDQuant with GPTQ on its residual and rotations; GPTQ at W4A8."""
W4A4_BASELINES = {
    "ptq4dit-w4a4": f"--method ptq4dit --wbits 4 --abits 4 --recon-iters {RECON_ITERS}",
    "ditas-w4a4": "--method ditas --wbits 4 --abits 4",
}
"""Issue 18's baselines: the seed methods at W4A4 with their defaults (``--plan
w4a4-baselines``, DDPM 50 like the W4A4 table)."""
W4A4_ASYM = {
    "svdquant-gptq-r64-g32-asym-w4a4": (
        "--method svdquant --weight-solver gptq --no-a-symmetric --lowrank-rank 64 "
        "--a-group-size 32"
    ),
    "svdquant-gptq-asym-w4a4": "--method svdquant --weight-solver gptq --no-a-symmetric",
}
"""``--plan w4a4-asym``: SVDQuant with GPTQ and asymmetric 4-bit activation groups, the
lowest output errors of the CPU diagnostic (RESULTS.md, issue 18), both at DDPM 250 on the
real kernels (the W4A4 target), then at DDPM 50: the published rank and groups first, then
rank 64 with groups of 32 (whose 16-bit branch outweighs the testbed's 4-bit weights)."""
GROUPS64_RTN = f"--w-granularity group {GROUPS64}"  # rtn's weights are per channel by default
FAST_FORMATS = {
    "rtn-fp8-w8a8": (
        "--method rtn --wbits 8 --abits 8 --w-fmt fp8_e4m3 --w-granularity channel --a-fmt fp8_e4m3"
    ),
    "rtn-w4-fp8a": "--method rtn --wbits 4 --abits 8 --a-fmt fp8_e4m3",
    "gptq-w4-fp8a": "--method gptq --wbits 4 --abits 8 --a-fmt fp8_e4m3 --w-granularity channel",
    "rtn-w8a8": "--method rtn --wbits 8 --abits 8",
}
"""``--plan fast-formats`` (issue 19): the formats that reach its speed targets (FP8
activations; W8A8 in FP8, W4A8 as int4 weights per channel by RTN and by GPTQ) next to
RTN's int8 W8A8, DDPM 250 on the real kernels. On the CPU their output error was about twice
int8's (RESULTS.md): FID says what that costs."""
W4A4_MORE = [
    (1, "svdquant-gptq-rotate-w4a4", 250, W4A4["svdquant-gptq-rotate-w4a4"]),
    (1, "rotate-w4a4", 50, f"--method rtn --wbits 4 --abits 4 --rotate {GROUPS64_RTN}"),
    (1, "gptq-rotate-w4a4", 50, f"--method gptq --wbits 4 --abits 4 --rotate {GROUPS64}"),
    (2, "ditas-w4a4", 50, W4A4_BASELINES["ditas-w4a4"]),
    (3, "gptq-w4a8", 250, W4A4["gptq-w4a8"]),
    (3, "svdquant-w4a4", 250, W4A4["svdquant-w4a4"]),
]
"""Issue 18's second lease (``--plan w4a4-more``), most wanted first: the W4A4 target's
DDPM 250 row, rotation alone and with GPTQ (SVDQuant's activation groups), DiTAS at W4A4
as a baseline, then the DDPM 250 rows of GPTQ W4A8 and SVDQuant alone."""
W4A4_250 = [
    (1, "svdquant-gptq-rotate-w4a4", 50),
    (1, "svdquant-gptq-rotate-w4a4", 250),
    (2, "gptq-w4a8", 250),
    (3, "svdquant-w4a4", 250),
]
"""``--plan w4a4-250``: the DDPM 250 rows of issue 18 sampled on the real kernels (the
simulated W4A4 model is too slow for 10,000 samples at 250 steps in one lease), with the
best W4A4 row at DDPM 50 too, to compare with its simulated FID."""


@dataclass(order=True)
class Job:
    priority: int
    run: str = field(compare=False)
    steps: int = field(compare=False)
    flags: str = field(compare=False)
    num_samples: int = field(compare=False, default=10_000)
    backend: str = field(compare=False, default="simulated")
    """How ``ditq sample`` runs the quantized model: simulated, or cuda (real kernels)."""
    resumable: bool = field(compare=False, default=False)
    """Quantize with ``--resume-dir OUT/RUN.resume`` and the calibration set saved to (or,
    once saved, read from) ``OUT/RUN.calib.safetensors``: a calibration longer than a lease
    goes on in the next one from its finished units (the lease script's ``pack``/``unpack``
    stages carry both)."""


def plan(names: list[str]) -> list[Job]:
    jobs = [Job(0, "fp", s, "", FP_PSNR_SAMPLES) for s in (50, 250, 100)]
    if "headline" in names:
        jobs += [Job(1, r, 50, f) for r, f in HEADLINE.items()]
        jobs += [Job(2, r, 250, f) for r, f in HEADLINE.items()]
    if "ablation" in names:
        jobs += [Job(3, r, 50, f) for r, f in ABLATION.items()]
    if "official-keep-patch" in names:
        jobs += [Job(1, r, 50, f) for r, f in OFFICIAL_KEEP_PATCH.items()]
    if "official" in names:
        jobs += [Job(1, r, 50, f) for r, f in OFFICIAL.items()]
        jobs += [Job(2, r, 250, f) for r, f in OFFICIAL.items()]
    if "w4a4" in names:
        jobs += [Job(1, r, 50, f) for r, f in W4A4.items()]
        jobs += [Job(2, r, 250, f) for r, f in W4A4.items()]
    if "w4a4-more" in names:
        jobs += [Job(p, r, steps, f) for p, r, steps, f in W4A4_MORE]
    if "w4a4-asym" in names:
        wide, published = W4A4_ASYM
        for priority, run in enumerate((published, wide), start=1):
            jobs.append(Job(priority, run, 250, W4A4_ASYM[run], backend="cuda"))
            jobs.append(Job(priority + 2, run, 50, W4A4_ASYM[run]))
    if "w4a4-baselines" in names:
        jobs += [Job(1, r, 50, f) for r, f in W4A4_BASELINES.items()]
    if "official-20k" in names:  # first: its calibration is the longest
        run = "ptq4dit-official-w4a8-20k"
        jobs.append(Job(1, run, 50, OFFICIAL_20K, resumable=True))
        jobs.append(Job(2, run, 250, OFFICIAL_20K, backend="cuda", resumable=True))
    if "official-250" in names:
        jobs += [
            Job(1 if r.startswith("ptq4dit-official") else 3, r, 250, f, backend="cuda")
            for r, f in OFFICIAL.items()
        ]
        jobs.append(Job(2, "ptq4dit-blocks-pct-w8a8", 50, OFFICIAL["ptq4dit-blocks-pct-w8a8"]))
    if "w4a4-250" in names:
        jobs += [Job(p, r, steps, W4A4[r], backend="cuda") for p, r, steps in W4A4_250]
    if "fast-formats" in names:
        jobs += [
            Job(priority, r, 250, f, backend="cuda")
            for priority, (r, f) in enumerate(FAST_FORMATS.items(), start=1)
        ]
    if "headline" in names:
        jobs += [Job(4, r, 100, f) for r, f in HEADLINE.items()]
    return sorted(jobs)


class Queue:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        (self.out / "logs").mkdir(parents=True, exist_ok=True)
        self.pending = plan(args.plan.split(","))
        if args.steps:  # only these sampler settings
            wanted = {int(n) for n in args.steps.split(",")}
            self.pending = [job for job in self.pending if job.steps in wanted]
        if args.results:  # measured in an earlier lease: only what is still missing
            done = [Path(d) for d in args.results]
            self.pending = [
                j
                for j in self.pending
                if j.run == "fp"
                or not any((d / j.run / f"eval_ddpm{j.steps}.json").exists() for d in done)
            ]
            needed = {j.steps for j in self.pending if j.run != "fp"}
            self.pending = [j for j in self.pending if j.run != "fp" or j.steps in needed]
        for job in self.pending:
            job.num_samples = min(job.num_samples, args.num_samples)
        if args.eval_only:  # evaluate what was sampled, nothing else
            self.pending = [
                j
                for j in self.pending
                if (self.out / j.run / f"samples_ddpm{j.steps}.npz").exists()
            ]
        self.lock = threading.Lock()
        self.busy_runs: set[str] = set()  # runs being quantized
        self.status_path = self.out / "status.json"
        self.status = json.loads(self.status_path.read_text()) if self.status_path.exists() else {}

    def record(self, key: str, **values) -> None:
        with self.lock:
            self.status[key] = values
            tmp = self.status_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.status, indent=2) + "\n")
            os.replace(tmp, self.status_path)

    def execute(self, key: str, command: list[str], gpu: str) -> bool:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu, "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        with open(self.out / "logs" / f"{key}.log", "a") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        seconds = time.perf_counter() - start
        self.record(key, command=" ".join(command), seconds=round(seconds, 1), rc=code, gpu=gpu)
        return code == 0

    def quantize(self, job: Job, gpu: str) -> bool:
        directory = self.out / job.run
        if job.run == "fp" or (directory / "ditq.json").exists():
            return True
        command = [
            sys.executable,
            "-m",
            "ditq",
            "quantize",
            "--model",
            self.args.model,
            "--vae",
            "none",
            *job.flags.split(),
            *self.args.quantize_flags.split(),
            *(self.resume_flags(job.run) if job.resumable else []),
            "--device",
            self.args.device,
            "--quiet",
            "--out",
            str(directory),
        ]
        return self.execute(f"{job.run}.quantize", command, gpu)

    def resume_flags(self, run: str) -> list[str]:
        """:attr:`Job.resumable`'s flags: the resume directory and the calibration set."""
        calib = self.out / f"{run}.calib.safetensors"
        calib_flag = "--calib-set" if calib.exists() else "--save-calib-set"
        return ["--resume-dir", str(self.out / f"{run}.resume"), calib_flag, str(calib)]

    def sample(self, job: Job, gpu: str) -> bool:
        directory = self.out / job.run
        directory.mkdir(exist_ok=True)
        samples = directory / f"samples_ddpm{job.steps}.npz"
        if samples.exists():
            return True
        if job.run == "fp":
            (directory / "run.json").write_text('{"name": "fp", "method": "fp", "bits": "FP"}\n')
        source = self.args.model if job.run == "fp" else str(directory)
        command = [
            sys.executable,
            "-m",
            "ditq",
            "sample",
            "--model",
            source,
            "--vae",
            "none",
            "--sampler",
            "ddpm",
            "--steps",
            str(job.steps),
            "--cfg-scale",
            "1.5",
            "--classes",
            "0,1,2,3,4,5,6,7,8,9",
            "--num-samples",
            str(job.num_samples),
            "--batch-size",
            str(self.args.batch_size),
            "--seed",
            "0",
            "--dtype",
            "bf16",
            "--backend",
            job.backend,
            "--device",
            self.args.device,
            "--out",
            str(samples),
        ]
        key = f"{job.run}.ddpm{job.steps}.sample"
        attempts = ([*command, "--compile"], [*command, "--compile", "--no-cuda-graphs"], command)
        return any(self.execute(key, attempt, gpu) for attempt in attempts)

    def evaluate(self, job: Job, gpu: str) -> bool:
        directory = self.out / job.run
        result = directory / f"eval_ddpm{job.steps}.json"
        has_reference = self.args.ref and Path(self.args.ref).exists()
        if job.run == "fp" or result.exists() or not has_reference:
            return True
        command = [
            sys.executable,
            "-m",
            "ditq",
            "eval",
            "--samples",
            str(directory / f"samples_ddpm{job.steps}.npz"),
            "--ref",
            self.args.ref,
            "--inception-weights",
            self.args.inception,
            "--batch-size",
            "500",
            "--device",
            self.args.device,
            "--quiet",
            "--out",
            str(result),
        ]
        fp_samples = self.out / "fp" / f"samples_ddpm{job.steps}.npz"
        if job.run != "fp" and fp_samples.exists():
            command[4:4] = ["--vs", str(fp_samples)]
        return self.execute(f"{job.run}.ddpm{job.steps}.eval", command, gpu)

    def take(self) -> Job | None:
        """The first pending job whose run is not being quantized by another worker."""
        with self.lock:
            for job in self.pending:
                quantized = job.run == "fp" or (self.out / job.run / "ditq.json").exists()
                if quantized or job.run not in self.busy_runs:
                    self.pending.remove(job)
                    if not quantized:
                        self.busy_runs.add(job.run)
                    return job
            return None

    def worker(self, gpu: str) -> None:
        gpu, _, ready_file = gpu.partition(":")
        while ready_file and not Path(ready_file).exists():  # the GPU is busy until then
            time.sleep(10)
        while True:
            job = self.take()
            if job is None:
                with self.lock:
                    if not self.pending:
                        return
                time.sleep(5)
                continue
            try:
                if self.quantize(job, gpu):
                    with self.lock:
                        self.busy_runs.discard(job.run)
                    if self.sample(job, gpu):
                        self.evaluate(job, gpu)
            finally:
                with self.lock:
                    self.busy_runs.discard(job.run)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--gpus",
        default="0",
        help="comma-separated GPU indices; GPU:FILE joins the queue once FILE exists",
    )
    parser.add_argument("--plan", default="headline,ablation")
    parser.add_argument("--ref", help="reference statistics (ditq eval --build-ref)")
    parser.add_argument("--inception", help="Inception weights")
    parser.add_argument("--batch-size", type=int, default=2500)
    parser.add_argument("--num-samples", type=int, default=10_000)
    parser.add_argument("--steps", help="only these DDPM step counts, e.g. 100 or 50,250")
    parser.add_argument(
        "--results",
        action="append",
        help="results of an earlier run (RUN/eval_ddpmN.json): those jobs are not run again "
        "(repeatable)",
    )
    parser.add_argument("--device", default="cuda", help="cuda (one GPU per worker) or cpu")
    parser.add_argument(
        "--quantize-flags", default="", help="appended to every job's ditq quantize flags"
    )
    parser.add_argument("--eval-only", action="store_true", help="only evaluate existing samples")
    args = parser.parse_args()
    queue = Queue(args)
    threads = [threading.Thread(target=queue.worker, args=(g,)) for g in args.gpus.split(",")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


if __name__ == "__main__":
    main()

"""How much PTQ4DiT's activation ranges depend on sampling the values: the best-of-percentiles
range (``percentile_search``, METHODS.md "PTQ4DiT") of a few inputs of the FP model over a
calibration set, from every value against from a uniform sample of at most N values
(``SampleObserver``, N = 1,000,000 in every calibration), over several seeds.

    python benchmarks/range_sample_size.py --model ../shared/models/dit_s2_cifar10.pt \
        --layer x_embedder.proj --layer blocks.0.attn.qkv --layer blocks.6.mlp.fc2 \
        --layer blocks.11.attn.attn_act --layer final_layer.linear

The calibration set is PTQ4DiT's published one unless ``--calib`` (JSON overrides of
``CalibSettings``) says otherwise; the inputs are those of the FP model (no balancing folded,
no weight quantized), so this measures the sampling, not a calibration. Per input: its number
of values, the range from every value, and per sample size, over the seeds, the largest and
the mean distance of a sampled endpoint from the exact one (over the exact range's width) and
the lowest and highest L2 error of quantizing every value with a sampled range relative to
the exact range's (1.0 = as good). One pass of the calibration set per input keeps one
input's values in memory at a time.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ditq import load_model
from ditq.calib.hooks import collect_input_stats
from ditq.calib.settings import CalibSettings
from ditq.methods import METHODS
from ditq.quant.observer import SampleObserver
from ditq.quant.quantizer import fake_quantize, find_range, qparams_from_range
from ditq.quant.spec import QuantSpec


class KeepAll:
    """Every value offered, in order (the exact reference)."""

    def __init__(self) -> None:
        self.chunks: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        self.chunks.append(x.detach().reshape(-1).float().clone())


class Fanout:
    """Offers every batch to several observers, so that one pass feeds them all."""

    def __init__(self, observers: list) -> None:
        self.observers = observers

    def update(self, x: torch.Tensor) -> None:
        for observer in self.observers:
            observer.update(x)


def squared_error(values: torch.Tensor, x_min: torch.Tensor, x_max: torch.Tensor, spec) -> float:
    scale, zero_point = qparams_from_range(x_min, x_max, spec)
    total = 0.0
    for chunk in values.split(1 << 24):
        error = fake_quantize(chunk, scale, zero_point, spec.bits, spec.symmetric) - chunk
        total += float(error.double().square().sum())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--layer", action="append", required=True, help="module or *_act name")
    parser.add_argument("--abits", type=int, default=8)
    parser.add_argument("--sizes", default="1000000,4000000")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--calib", default="{}", help="JSON overrides of PTQ4DiT's set")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    torch.manual_seed(0)
    method = METHODS["ptq4dit"]
    config = method.config_class(wbits=8, abits=args.abits)
    model = load_model(args.model)
    settings = CalibSettings(**{**method.default_calib.to_dict(), **json.loads(args.calib)})
    start = time.perf_counter()
    calib = settings.build(model, batch_size=args.batch_size, progress=False)
    print(f"calibration set: {len(calib.t)} entries in {time.perf_counter() - start:.0f} s")
    sizes = [int(s) for s in args.sizes.split(",")]
    for layer in args.layer:
        spec: QuantSpec = config.attention_spec() if layer.endswith("_act") else config.act_spec()
        exact = KeepAll()
        sampled = {(n, s): SampleObserver(n, seed=s) for n in sizes for s in range(args.seeds)}
        fanout = Fanout([exact, *sampled.values()])
        collect_input_stats(
            model, calib, lambda _, f=fanout: f, [layer], batch_size=args.batch_size, progress=False
        )
        values = torch.cat(exact.chunks)
        exact.chunks.clear()
        exact_min, exact_max = find_range(values, spec)
        reference = squared_error(values, exact_min, exact_max, spec)
        width = float(exact_max - exact_min)
        print(
            f"{layer}: {values.numel():,} values, exact range "
            f"[{float(exact_min):.5g}, {float(exact_max):.5g}]"
        )
        for n in sizes:
            distances, errors = [], []
            for seed in range(args.seeds):
                x_min, x_max = find_range(sampled[n, seed].result(), spec)
                distances.append(
                    max(abs(float(x_min - exact_min)), abs(float(x_max - exact_max))) / width
                )
                errors.append(squared_error(values, x_min, x_max, spec) / reference)
            print(
                f"  sample of {n:>11,}: endpoint distance / range width max {max(distances):.4f}"
                f" mean {sum(distances) / len(distances):.4f}; L2 error vs exact range "
                f"min {min(errors):.4f} max {max(errors):.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()

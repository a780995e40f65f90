"""Bytes of a quantized directory's ``model.safetensors`` for DiT-XL/2 (random weights) and
the testbed shape, by bits and by which layers are quantized (CPU; sizes do not depend on
the machine).

    python benchmarks/checkpoint_sizes.py [--arch DiT-XL/2] [--out sizes.json]

"blocks" quantizes the four linears of every block (the methods' default); "all" also the
adaLN modulation linears and the final layer (the embedders stay in float: the patch
embedding is a convolution). Layers left in float are stored in fp32, as the simulated
model computes them.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

import ditq
from ditq.methods import RTNConfig
from ditq.models.dit import DiT, config_for
from ditq.pipeline.checkpoint import WEIGHTS
from ditq.pipeline.config import LayerSelection

SELECTIONS = {
    "blocks": LayerSelection(),
    "all": LayerSelection(blocks=True, adaln=True, final_layer=True),
}


def sizes_for(arch: str, **overrides) -> dict[str, int]:
    torch.manual_seed(0)
    base = DiT(config_for(arch, **overrides)).eval()
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            path = Path(tmp) / f"{name}.safetensors"
            save_file({k: v.to(dtype).contiguous() for k, v in base.state_dict().items()}, path)
            sizes[name] = path.stat().st_size
            path.unlink()
        for layers, selection in SELECTIONS.items():
            for bits in (8, 4):
                granularity = "group" if bits == 4 else "channel"
                config = RTNConfig(
                    wbits=bits, abits=8, w_granularity=granularity, a_dynamic=True, layers=selection
                )
                model = DiT(base.config).eval()
                model.load_state_dict(base.state_dict())
                ditq.quantize(model, config, progress=False)
                out = ditq.save(model, Path(tmp) / "q")
                sizes[f"w{bits}-{layers}"] = (out / WEIGHTS).stat().st_size
                del model
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out")
    args = parser.parse_args()
    result = {
        "DiT-XL/2 256px": sizes_for("DiT-XL/2", input_size=32),
        "testbed DiT-S/2 32px": sizes_for("DiT-S/2", input_size=32, in_channels=3, num_classes=10),
    }
    for model, sizes in result.items():
        print(model + ": " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in sizes.items()))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

"""How far diffusers' DiT layout is from the official model on the same weights.

    python benchmarks/layout_difference.py --model ../shared/models/dit_s2_cifar10.pt

Converts the official checkpoint to diffusers' ``DiTTransformer2DModel`` with the mapping
of diffusers' conversion script (``tests/models/test_diffusers_dit.py``) and prints the
relative output difference on random inputs, as converted and once diffusers' timestep
frequencies and position table are aligned with the official ones.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests" / p) for p in ("", "models")]

from test_diffusers_dit import official_to_diffusers, with_official_embeddings  # noqa: E402

import ditq  # noqa: E402
from ditq.models import DiffusersDiT  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--entries", type=int, default=16)
    args = parser.parse_args()
    official = ditq.load_model(args.model)
    config = official.config
    generator = torch.Generator().manual_seed(0)
    size = (args.entries, config.in_channels, config.input_size, config.input_size)
    x = torch.randn(size, generator=generator)
    t = torch.randint(0, 1000, (args.entries,), generator=generator)
    y = torch.randint(0, config.num_classes, (args.entries,), generator=generator)
    converted = official_to_diffusers(official)
    with torch.no_grad():
        reference = official(x, t, y)
        as_converted = converted(x, timestep=t, class_labels=y).sample
        aligned = DiffusersDiT(with_official_embeddings(converted, official))(x, t, y)
    for name, out in (("as converted", as_converted), ("aligned", aligned)):
        difference = float((out - reference).norm() / reference.norm())
        print(f"{name}: relative output difference {difference:.3g}")


if __name__ == "__main__":
    main()

"""``range_sample_size.py`` compares the percentile search on samples with the search on every
value: a sample that can hold every value must give the exact range, a small one must not."""

from __future__ import annotations

import re
import sys

from conftest import load_script


def test_a_sample_holding_every_value_gives_the_exact_range(monkeypatch, capsys):
    script = load_script("benchmarks/range_sample_size.py")
    calib = '{"num_samples": 2, "steps": [0, 3], "num_steps": 4, "classes": [0, 1]}'
    # 2 trajectories x 2 steps x (cond, uncond) = 8 entries of 3 x 32 x 32 pixels
    argv = ["range_sample_size.py", "--model", "demo", "--layer", "x_embedder.proj"]
    argv += ["--calib", calib, "--sizes", "24576,100", "--seeds", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    script.main()
    out = capsys.readouterr().out
    assert "x_embedder.proj: 24,576 values" in out
    pattern = r"max ([\d.]+) mean ([\d.]+); L2 .* min ([\d.]+) max ([\d.]+)"
    everything, small = re.findall(pattern, out)
    assert everything == ("0.0000", "0.0000", "1.0000", "1.0000")
    assert float(small[0]) > 0

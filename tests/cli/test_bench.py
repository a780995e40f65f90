"""``ditq bench`` on the CPU with a tiny checkpoint, and the backend flag's errors."""

import json

import pytest
import torch

from ditq.cli import main

from conftest import save_checkpoint, tiny_dit


def test_bench_writes_json_and_markdown(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_dit().state_dict(), path)
    args = ["bench", "--model", str(path), "--batches", "1", "--iters", "1", "--warmup", "0"]
    args += ["--steps", "1", "--variants", "bf16,w8a8-static,w4a16", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"bf16", "w8a8-static", "w4a16"}
    assert all("error" not in r and r["latency_ms"] > 0 and r["e2e_s"] > 0 for r in rows.values())
    assert rows["w8a8-static"]["kernels"] == {"int": 8}
    assert rows["w4a16"]["memory_bytes"] < rows["bf16"]["memory_bytes"]
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| w4a16 |" in table.replace(f"| {path} | 1 ", "")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variants", "int3"], "--variants 'int3': choose from"),
        (["--batches", "0"], "positive integers"),
    ],
)
def test_bench_bad_options(tmp_path, capsys, extra, message):
    args = ["bench", "--shapes", "DiT-S/8@64", "--device", "cpu", "--out", str(tmp_path)]
    assert main(args + extra) == 2
    assert message in capsys.readouterr().err


def test_sample_backend_errors(tmp_path, capsys):
    flags = save_checkpoint(tiny_dit(), tmp_path / "tiny.pt")
    base = ["sample", *flags, "--device", "cpu", "--steps", "1", "--grid", str(tmp_path / "g.png")]
    assert main(base + ["--backend", "fast"]) == 2
    assert "unknown backend 'fast'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(base + ["--backend", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err

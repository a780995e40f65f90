"""``ditq bench`` on the CPU with a tiny checkpoint, and the backend flag's errors."""

import json

import pytest
import torch

from ditq.cli import bench, main
from ditq.errors import DitqError
from ditq.eval import speed

from conftest import save_checkpoint, tiny_dit


def test_bench_writes_json_and_markdown(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_dit().state_dict(), path)
    args = ["bench", "--model", str(path), "--batches", "1", "--iters", "1", "--warmup", "0"]
    args += ["--steps", "1", "--variants", "bf16,w8a8-static,w4a16,w4a8-fp8", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert set(rows) == {"bf16", "w8a8-static", "w4a16", "w4a8-fp8"}
    assert rows["w4a8-fp8"]["kernels"] == {"fp8": 8, "fused-mlp": 2}
    assert all("error" not in r and r["latency_ms"] > 0 and r["e2e_s"] > 0 for r in rows.values())
    assert rows["w8a8-static"]["kernels"] == {"int": 8, "fused-mlp": 2}  # the default
    assert rows["w4a16"]["memory_bytes"] < rows["bf16"]["memory_bytes"]
    table = (tmp_path / "out" / "bench.md").read_text()
    assert "| w4a16 |" in table.replace(f"| {path} | 1 ", "")
    assert report["complete"]


def test_an_interrupted_bench_keeps_the_rows_measured_so_far(tmp_path, monkeypatch, capsys):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_dit().state_dict(), path)
    measured = bench.bench_variant

    def interrupted_after_bf16(base, variant, *args):
        if variant != "bf16":
            raise KeyboardInterrupt
        return measured(base, variant, *args)

    monkeypatch.setattr(bench, "bench_variant", interrupted_after_bf16)
    args = ["bench", "--model", str(path), "--batches", "1", "--iters", "1", "--warmup", "0"]
    args += ["--steps", "1", "--variants", "bf16,w8a8-static", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 130
    assert "interrupted" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert not report["complete"] and [r["variant"] for r in report["rows"]] == ["bf16"]
    assert not (tmp_path / "out" / "bench.md").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--variants", "int3"], "--variants 'int3': choose from"),
        (["--batches", "0"], "positive integers"),
        (["--cuda-graphs"], "--cuda-graphs replays compiled blocks on a GPU"),
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


def test_bench_profile_splits_the_call_by_kernel_category(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_dit().state_dict(), path)
    args = ["bench", "--model", str(path), "--batches", "2", "--iters", "1", "--warmup", "0"]
    args += ["--steps", "0", "--variants", "bf16", "--device", "cpu", "--profile"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    (row,) = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    profile = row["profile"]
    categories = profile["categories_ms"]
    assert categories["gemm"] > 0 and categories["attention"] > 0
    assert sum(categories.values()) == pytest.approx(profile["total_ms"])
    top = [k["ms"] for k in profile["top"]]
    assert top == sorted(top, reverse=True)
    assert "Where the time of one call goes" in (tmp_path / "out" / "bench.md").read_text()


@pytest.mark.parametrize(
    ("name", "category"),
    [
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64", "gemm"),
        ("_int_gemm_kernel", "gemm"),
        ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<96, 128>>", "attention"),
        ("triton_red_fused__to_copy_clamp_round_sum_0", "quantize"),
        ("triton_red_fused__scaled_mm__to_copy_abs_add_aminmax_clamp_div_2", "quantize"),
        ("triton_poi_fused_add_int_gemm_mul_5", "norm/elementwise"),
        ("_quantize_act_kernel", "quantize"),
        ("triton_per_fused_native_layer_norm_1", "norm/elementwise"),
        ("Memset (Device)", "other"),
    ],
)
def test_kernel_category(name, category):
    from ditq.eval.speed import kernel_category

    assert kernel_category(name) == category


def test_state_bytes_counts_what_a_tensor_subclass_holds():
    from ditq.eval.speed import state_bytes, tensor_bytes

    class Packed(torch.Tensor):  # a wrapper subclass holding int8 data and fp32 scales
        @staticmethod
        def __new__(cls, data, scale):
            return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=torch.bfloat16)

        def __init__(self, data, scale):
            self.data_, self.scale = data, scale

        def __tensor_flatten__(self):
            return ["data_", "scale"], None

        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError(func)

    packed = Packed(torch.zeros(64, 32, dtype=torch.int8), torch.ones(64))
    assert tensor_bytes(packed) == 64 * 32 + 64 * 4  # not 64 * 32 * 2 (bf16)
    assert state_bytes(torch.nn.Linear(32, 64)) == (64 * 32 + 64) * 4


def test_bench_no_fuse_mlp_times_the_unfused_kernels(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_dit().state_dict(), path)
    args = ["bench", "--model", str(path), "--batches", "1", "--iters", "1", "--warmup", "0"]
    args += ["--steps", "0", "--variants", "w8a8-static,w8a8-fp8", "--device", "cpu"]
    for flag, fused in (("--fuse-mlp", {"fused-mlp": 2}), ("--no-fuse-mlp", {})):
        assert main(args + [flag, "--out", str(tmp_path / flag)]) == 0
        report = json.loads((tmp_path / flag / "bench.json").read_text())
        rows = {r["variant"]: r for r in report["rows"]}
        assert rows["w8a8-static"]["kernels"] == {"int": 8, **fused}
        assert rows["w8a8-fp8"]["kernels"] == {"fp8": 8}  # FP8 layers have no fused MLP


def bench_rows(tmp_path, model, variants: str, *flags: str) -> dict[str, dict]:
    """``ditq bench`` of ``model`` on the CPU, one call per variant: its rows by variant."""
    path = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), path)
    args = ["bench", "--model", str(path), "--batches", "1", "--iters", "1", "--warmup", "0"]
    args += ["--steps", "0", "--variants", variants, "--device", "cpu", *flags]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    return {r["variant"]: r for r in report["rows"]}


def test_bench_int4_in_kernel_rows_name_the_layers_that_read_packed_weights(tmp_path):
    """``--int4-in-kernel``: every int4 layer's GEMM reads the packed bytes, which the row
    says (its kernels column); int8 weights have nothing to unpack."""
    blocks = len(tiny_dit().blocks)
    rows = bench_rows(tmp_path, tiny_dit(), "w4a8-fp8,w4a8-channel,w8a8-static", "--int4-in-kernel")
    assert rows["w4a8-fp8"]["kernels"] == {
        "fp8": 4 * blocks, "fused-mlp": blocks, "int4-in-kernel": 4 * blocks
    }  # fmt: skip
    assert rows["w4a8-channel"]["kernels"]["int4-in-kernel"] == 4 * blocks
    assert "int4-in-kernel" not in rows["w8a8-static"]["kernels"]
    (tmp_path / "unpacked").mkdir()
    unpacked = bench_rows(tmp_path / "unpacked", tiny_dit(), "w4a8-fp8")
    assert "int4-in-kernel" not in unpacked["w4a8-fp8"]["kernels"]


def test_bench_w4a8_all_quantizes_the_adaln_and_final_linears(tmp_path):
    model = tiny_dit()
    rows = bench_rows(tmp_path, model, "w4a8-channel,w4a8-all")
    blocks = len(model.blocks)
    assert rows["w4a8-channel"]["kernels"] == {"int": 4 * blocks, "fused-mlp": blocks}
    # each block's adaLN linear, the final layer's adaLN linear and its projection
    assert rows["w4a8-all"]["kernels"] == {"int": 5 * blocks + 2, "fused-mlp": blocks}
    assert rows["w4a8-all"]["memory_bytes"] < rows["w4a8-channel"]["memory_bytes"]


def test_bench_counts_fused_attentions_and_static_fp8_mlps(tmp_path):
    model = tiny_dit()
    rows = bench_rows(tmp_path, model, "w8a8-static-symw,w8a8-attn8,w8a8-fp8-static")
    blocks = len(model.blocks)
    assert rows["w8a8-static-symw"]["kernels"] == {"int": 4 * blocks, "fused-mlp": blocks}
    assert rows["w8a8-attn8"]["kernels"] == {
        "int": 4 * blocks,
        "fused-mlp": blocks,
        "fused-attention": blocks,
    }
    assert rows["w8a8-fp8-static"]["kernels"] == {"fp8": 4 * blocks, "fused-mlp": blocks}


def test_bench_times_a_quantized_directory_as_saved_and_its_float_architecture(
    tmp_path, monkeypatch
):
    """``--model RUN`` (written by ditq quantize): variant ``quantized`` is the model as
    saved (on the CPU: simulated, packed weights), the others run on its float architecture
    (random weights, built once for all of them) rather than failing on its quantized
    layers."""
    built = []
    float_architecture = bench.float_architecture
    monkeypatch.setattr(
        bench, "float_architecture", lambda m: built.append(m) or float_architecture(m)
    )
    model = tiny_dit()
    checkpoint, run = tmp_path / "tiny.pt", tmp_path / "rtn-w8a8"
    torch.save(model.state_dict(), checkpoint)
    quantize = ["quantize", "--model", str(checkpoint), "--num-heads", "2", "--vae", "none"]
    quantize += ["--method", "rtn", "--out", str(run), "--calib-samples", "2"]
    quantize += ["--calib-sampler", "ddim", "--calib-num-steps", "3", "--calib-steps", "2"]
    assert main([*quantize, "--device", "cpu", "--quiet"]) == 0
    args = ["bench", "--model", str(run), "--batches", "1", "--iters", "1", "--warmup", "0"]
    args += ["--steps", "0", "--variants", "bf16,w8a8-static,quantized", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "out")]) == 0
    rows = {
        r["variant"]: r for r in json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    }
    assert not any("error" in row for row in rows.values())
    blocks = len(model.blocks)
    assert rows["w8a8-static"]["kernels"] == {"int": 4 * blocks, "fused-mlp": blocks}
    assert "kernels" not in rows["quantized"]  # the CPU runs the simulated layers
    assert rows["quantized"]["disk_bytes"] < rows["bf16"]["disk_bytes"] * 2  # int8 codes
    assert len(built) == 1


def test_build_variant_takes_the_base_its_variant_needs():
    from ditq.eval.speed import denoiser_inputs, quantize_random
    from ditq.methods import RTNConfig

    float_model, quantized = tiny_dit(), tiny_dit()
    inputs = denoiser_inputs(quantized, 1, "cpu", torch.float32)
    quantize_random(quantized, RTNConfig(wbits=8, abits=8), inputs)
    with pytest.raises(DitqError, match="starts from a float model"):
        speed.build_variant(quantized, "bf16", "cpu", compile_models=False)
    with pytest.raises(DitqError, match="times a directory written by ditq quantize"):
        speed.build_variant(float_model, speed.AS_QUANTIZED, "cpu", compile_models=False)
    model, _ = speed.build_variant(
        speed.float_architecture(quantized), "bf16", "cpu", compile_models=False
    )
    assert model.config == quantized.config


def test_bench_quantized_variant_needs_a_quantized_directory(tmp_path, capsys):
    path = tmp_path / "tiny.pt"
    torch.save(tiny_dit().state_dict(), path)
    args = ["bench", "--model", str(path), "--variants", "bf16,quantized", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert "--variants quantized times a directory written by ditq quantize" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def test_testbed_shape_is_the_shared_checkpoint_architecture():
    from ditq import load_model
    from ditq.eval.speed import shape_model

    from conftest import TESTBED

    if not TESTBED.is_file():
        pytest.skip("../shared/models/dit_s2_cifar10.pt is not there")
    model = shape_model("testbed")
    assert model.config == load_model(TESTBED, progress=False).config
    assert model.x_embedder.num_patches == 256


def test_warm_up_runs_until_the_call_time_settles(monkeypatch):
    durations = iter([5.0] * 4 + [2.0] * 4 + [1.0] * 4 + [1.01] * 4 + [1.0] * 40)
    clock = {"now": 0.0}
    monkeypatch.setattr(speed.time, "perf_counter", lambda: clock["now"])

    def call():  # autotuning makes the first rounds slow, then the time settles
        clock["now"] += next(durations)

    assert speed.warm_up(call, "cpu", 4) == 16  # 5 s, 2 s, 1 s, then 1.01 s: within 3%
    assert speed.warm_up(call, "cpu", 0) == 0
    endless = iter(float(n) for n in range(1, 10_000))
    monkeypatch.setattr(speed.time, "perf_counter", lambda: next(endless) ** 2)
    assert speed.warm_up(lambda: None, "cpu", 2) == 2 * speed.WARMUP_MAX_ROUNDS  # capped


def test_a_pixart_shape_benches_through_its_adapter(tmp_path, monkeypatch):
    """``--shapes PixArt-XL/2@PIXELS`` (shrunk here): diffusers' PixArt with a random
    prompt table, timed in BF16 and with real W8A8 kernels on its block linears."""
    pytest.importorskip("diffusers")
    tiny = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16)
    tiny.update(cross_attention_dim=32)  # caption_channels stays the shape's own (T5-XXL)
    monkeypatch.setattr(speed, "PIXART_OVERRIDES", tiny)
    monkeypatch.setattr(speed, "PIXART_PROMPT_TOKENS", 5)
    args = ["bench", "--shapes", "PixArt-XL/2@64", "--batches", "1", "--iters", "1"]
    args += ["--warmup", "0", "--variants", "bf16,w8a8-static", "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    rows = json.loads((tmp_path / "out" / "bench.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["bf16", "w8a8-static"]
    assert all("error" not in r and r["latency_ms"] > 0 for r in rows), rows
    assert rows[1]["kernels"]  # real low-bit layers in place of the block linears
    model = speed.pixart_shape_model(64)
    assert model.transformer.caption_projection.linear_1.in_features == 4096


@pytest.mark.parametrize("scope, label", [("model", "whole call"), ("blocks", "each block")])
def test_rows_count_graphs_compiled_without_cuda_graphs(scope, label):
    """A graph that Inductor compiles without CUDA graphs (here the call's, or its one
    block's: the CPU has none) is counted in its row, so that a variant which silently pays
    every kernel launch shows in the report, with the scope it was compiled in."""
    settings = speed.BenchSettings(
        iters=1, warmup=0, compile=True, cuda_graphs=True, compile_scope=scope
    )
    model = tiny_dit(depth=1)
    (row,) = speed.bench_variant(model, speed.BASELINE, [1], settings)
    assert "error" not in row and row["cuda_graphs"] and row["compile_scope"] == scope
    assert row["cuda_graph_skips"] == 1
    assert f"(compiled, {label}, CUDA graphs (1 skipped))" in speed.markdown(
        [{"shape": "tiny", **row}], "cpu"
    )

"""``ditq quantize`` then ``ditq sample --model DIR`` on a tiny checkpoint."""

import json

import numpy as np
import pytest
import torch

from ditq.cli import main

from conftest import tiny_dit

FAST_CALIB = [
    "--calib-samples",
    "2",
    "--calib-sampler",
    "ddim",
    "--calib-num-steps",
    "4",
    "--calib-steps",
    "2",
    "--device",
    "cpu",
    "--quiet",
]


def _quantize(model_args, out, *extra):
    return main(
        [
            "quantize",
            *model_args,
            "--out",
            str(out),
            *FAST_CALIB,
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "method, bits",
    [("rtn", "8"), ("smoothquant", "8"), ("single-step", "4")],
)
def test_quantize_then_sample(model_args, tmp_path, method, bits, capsys):
    out = tmp_path / "q"
    extra = ["--w-group-size", "16"] if method == "single-step" else []
    assert (
        _quantize(model_args, out, "--method", method, "--wbits", bits, "--abits", "8", *extra) == 0
    )
    assert f"{method} W{bits}A8" in capsys.readouterr().out
    manifest = json.loads((out / "ditq.json").read_text())
    assert manifest["method"] == method and manifest["method_config"]["wbits"] == int(bits)
    assert manifest["calibration"]["settings"]["num_steps"] == 4
    report = json.loads((out / "calibration_report.json").read_text())
    assert report["wall_time_s"]["total"] > 0 and len(report["weight_sqnr_db"]) == 8
    samples = tmp_path / "s.npz"
    assert (
        main(
            [
                "sample",
                "--model",
                str(out),
                "--vae",
                "none",
                "--sampler",
                "ddim",
                "--steps",
                "3",
                "--num-samples",
                "2",
                "--out",
                str(samples),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 0
    )
    assert np.load(samples)["arr_0"].shape == (2, 8, 8, 3)


def test_w16a16_directory_samples_exactly_like_the_fp_model(model_args, tmp_path):
    assert (
        _quantize(model_args, tmp_path / "q", "--method", "rtn", "--wbits", "16", "--abits", "16")
        == 0
    )
    args = [
        "--vae",
        "none",
        "--sampler",
        "ddim",
        "--steps",
        "3",
        "--num-samples",
        "3",
        "--device",
        "cpu",
        "--quiet",
        "--seed",
        "5",
    ]
    assert (
        main(["sample", "--model", str(tmp_path / "q"), *args, "--out", str(tmp_path / "q.npz")])
        == 0
    )
    assert (
        main(
            [
                "sample",
                *model_args,
                *args,
                "--out",
                str(tmp_path / "fp.npz"),
            ]
        )
        == 0
    )
    np.testing.assert_array_equal(
        np.load(tmp_path / "q.npz")["arr_0"], np.load(tmp_path / "fp.npz")["arr_0"]
    )


def test_saved_calibration_set_is_reused_and_checked(model_args, tmp_path, capsys):
    calib = tmp_path / "calib.safetensors"
    assert (
        _quantize(model_args, tmp_path / "a", "--method", "rtn", "--save-calib-set", str(calib))
        == 0
    )
    assert _quantize(model_args, tmp_path / "b", "--method", "rtn", "--calib-set", str(calib)) == 0
    other = tmp_path / "other.pt"
    torch.save(tiny_dit(num_classes=7).state_dict(), other)
    assert (
        main(
            [
                "quantize",
                "--model",
                str(other),
                "--num-heads",
                "2",
                "--vae",
                "none",
                "--method",
                "rtn",
                "--out",
                str(tmp_path / "c"),
                "--calib-set",
                str(calib),
                "--device",
                "cpu",
                "--quiet",
            ]
        )
        == 2
    )
    assert "num_classes" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "rtn", "--wbits", "1"], "bits"),
        (
            ["--method", "rtn", "--wbits", "4", "--w-granularity", "group", "--w-group-size", "24"],
            "does not divide",
        ),
        (["--method", "rtn", "--a-granularity", "token"], "--a-dynamic"),
        (["--method", "rtn", "--keep-float", "blocks.9.*"], "matches no selected layer"),
        (["--method", "rtn", "--calib-steps", "9"], "9"),
        (
            ["--method", "rtn", "--alpha", "0.9"],
            "--alpha is a setting of smoothquant; --method rtn does not take it",
        ),
        (["--method", "rtn", "--recon-iters", "5"], "--recon-iters is a setting of ptq4dit"),
        (
            ["--method", "ptq4dit", "--recon-compile", "yes"],
            "--recon-compile 'yes' is not known; choose one of auto, on, graphs, off",
        ),
        (
            ["--method", "rtn", "--w-granularity", "channel", "--w-group-size", "16"],
            "--w-group-size needs grouped ranges, not --w-granularity channel",
        ),
        (
            ["--method", "rtn", "--a-granularity", "tensor", "--a-group-size", "16"],
            "--a-group-size needs grouped ranges, not --a-granularity tensor",
        ),
    ],
)
def test_bad_settings_are_one_clear_error_and_write_nothing(
    model_args, tmp_path, capsys, extra, message
):
    assert _quantize(model_args, tmp_path / "q", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_group_size_alone_selects_groups(model_args, tmp_path):
    """A group size without a granularity means groups (it was silently ignored: rtn's
    weights stayed per channel)."""
    out = tmp_path / "q"
    flags = ["--method", "rtn", "--wbits", "4", "--w-group-size", "16", "--a-group-size", "16"]
    assert _quantize(model_args, out, *flags) == 0
    config = json.loads((out / "ditq.json").read_text())["method_config"]
    assert (config["w_granularity"], config["w_group_size"]) == ("group", 16)
    assert (config["a_granularity"], config["a_group_size"]) == ("group", 16)


@pytest.mark.parametrize(
    ("flag", "symmetric"), [(None, True), ("--no-a-symmetric", False), ("--a-symmetric", True)]
)
def test_a_method_default_can_be_turned_off_and_on(model_args, tmp_path, flag, symmetric):
    """svdquant's activations are symmetric by default; ``--no-a-symmetric`` makes them
    asymmetric (before, the flag could only turn symmetry on)."""
    from ditq import load_model
    from ditq.quant.layers import QuantLinear

    out = tmp_path / "q"
    flags = ["--method", "svdquant", "--a-group-size", "16", "--w-group-size", "16"]
    assert _quantize(model_args, out, *flags, *([flag] if flag else [])) == 0
    config = json.loads((out / "ditq.json").read_text())["method_config"]
    assert config["a_symmetric"] is symmetric
    layers = [m for m in load_model(out).modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.act_quantizer.spec.symmetric is symmetric for m in layers)


def test_smoothquant_respects_keep_float(model_args, tmp_path):
    out = tmp_path / "q"
    assert _quantize(model_args, out, "--method", "smoothquant", "--keep-float", "blocks.0.*") == 0
    layers = json.loads((out / "ditq.json").read_text())["layers"]
    assert not any(name.startswith("blocks.0.") for name in layers)
    assert "blocks.1.mlp.fc2" in layers
    report = json.loads((out / "calibration_report.json").read_text())
    smoothed = report["method"]["smoothing_factors"]
    assert smoothed and not any(name.startswith("blocks.0.") for name in smoothed)


def test_embedders_alone_quantize_the_patch_embedding_and_timestep_mlp(model_args, tmp_path):
    out = tmp_path / "q"
    assert _quantize(model_args, out, "--method", "rtn", "--layers", "embedders") == 0
    layers = json.loads((out / "ditq.json").read_text())["layers"]
    assert sorted(layers) == ["t_embedder.mlp.0", "t_embedder.mlp.2", "x_embedder.proj"]


def test_the_summary_names_float_formats(model_args, tmp_path, capsys):
    """int4 weights with FP8 activations: the one-line summary says so, not just W4A8."""
    fmt = ["--wbits", "4", "--abits", "8", "--a-fmt", "fp8_e4m3"]
    assert _quantize(model_args, tmp_path / "q", "--method", "rtn", *fmt) == 0
    assert "rtn W4A8 (activations fp8_e4m3): " in capsys.readouterr().out


def test_w16a16_ptq4dit_keeps_attention_in_float_and_reproduces_fp(model_args, tmp_path, capsys):
    out = tmp_path / "q"
    bits = ["--wbits", "16", "--abits", "16", "--recon-iters", "0"]
    assert _quantize(model_args, out, "--method", "ptq4dit", *bits) == 0
    assert "attention matmuls float" in capsys.readouterr().out
    assert json.loads((out / "ditq.json").read_text())["attention"] is None
    sample = ["--sampler", "ddim", "--steps", "3", "--num-samples", "3", "--device", "cpu"]
    sample += ["--quiet", "--seed", "5"]  # --vae auto: none for this pixel-space model
    assert main(["sample", "--model", str(out), *sample, "--out", str(tmp_path / "q.npz")]) == 0
    assert main(["sample", *model_args, *sample, "--out", str(tmp_path / "fp.npz")]) == 0
    np.testing.assert_array_equal(
        np.load(tmp_path / "q.npz")["arr_0"], np.load(tmp_path / "fp.npz")["arr_0"]
    )


def test_method_help_lists_only_that_methods_flags(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "ptq4dit", "--help"])
    text = capsys.readouterr().out
    assert "ptq4dit settings" in text and "--recon-chunks" in text and "(default 10)" in text
    assert "--alpha-grid" not in text and "--lowrank-rank" not in text
    with pytest.raises(SystemExit):
        main(["quantize", "--help", "--method=ditas"])
    text = capsys.readouterr().out
    assert "--alpha-grid" in text and "--balance" not in text
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    text = capsys.readouterr().out
    assert "--alpha-grid" in text and "--balance" in text  # every method's, each tagged


def test_resume_dir_keeps_solved_blocks_and_a_rerun_resumes_to_the_same_model(
    model_args, tmp_path, capsys
):
    resume = tmp_path / "resume"
    flags = ["--method", "ptq4dit", "--recon-iters", "3", "--resume-dir", str(resume)]
    flags += ["--recon-chunks", "2"]
    assert _quantize(model_args, tmp_path / "q1", *flags) == 0
    kept = sorted(p.name for p in resume.iterdir())
    assert {"blocks.0.pt", "blocks.1.pt"} <= set(kept)
    assert _quantize(model_args, tmp_path / "q2", *flags) == 0
    report = json.loads((tmp_path / "q2" / "calibration_report.json").read_text())
    units = report["method"]["reconstruction"]["units"]
    assert units and all(unit["resumed"] for unit in units.values())
    assert {unit["resume_difference"] for unit in units.values()} == {0.0}  # same machine
    first, second = ((tmp_path / q / "model.safetensors").read_bytes() for q in ("q1", "q2"))
    assert first == second
    assert sorted(p.name for p in resume.iterdir()) == kept
    # other reconstruction settings: refused, naming the directory's fix, nothing written
    flags[3] = "4"
    assert _quantize(model_args, tmp_path / "q3", *flags) == 2
    assert "delete it" in capsys.readouterr().err
    assert not (tmp_path / "q3").exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--method", "rtn"], "--method rtn with these settings solves none"),
        (["--method", "ptq4dit", "--recon-iters", "0"], "solves none"),
    ],
)
def test_resume_dir_without_a_solver_is_refused(model_args, tmp_path, capsys, flags, message):
    resume = tmp_path / "resume"
    assert _quantize(model_args, tmp_path / "q", *flags, "--resume-dir", str(resume)) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []

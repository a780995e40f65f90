"""The README's CPU examples run as written, at reduced sizes.

Every code block that follows a ``<!-- cpu-example -->`` line is run in a fresh directory
beside a ``shared`` link (so ``../shared`` is the project's shared data, as for a user of a
checkout), in order, as one script: bash blocks with ``set -e``, Python blocks with
``python``. Reductions only append flags (the last occurrence of a flag wins in argparse)
or change numbers in Python calls; the commands themselves are the README's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- cpu-example -->"
REDUCED_FLAGS = {
    "demo": "--methods single-step,rtn --bits w8a8 --num-samples 2 --steps 2 --calib-samples 1",
    "quantize": "--calib-samples 1 --calib-num-steps 4 --calib-steps 2 --recon-iters 0 "
    "--batch-size 8",
    "sample": "--num-samples 4 --batch-size 4 --steps 3",
    "analyze": "--calib-samples 1 --calib-num-steps 4 --calib-steps 2",
    "eval": "--batch-size 4",
}
"""Flags appended to each ``ditq`` subcommand of a bash example (sizes only)."""
BUILD_REF_FLAGS = "--limit 12"
PYTHON_REDUCTIONS = (
    (r"num_samples=\d+", "num_samples=1"),
    (r"num_steps=\d+", "num_steps=4"),
    (
        r"SamplingSettings\(sampler=\"ddim\", steps=\d+\)",
        'SamplingSettings(sampler="ddim", steps=3)',
    ),
    (r"generate\(\n    quantized, \d+,", "generate(\n    quantized, 2,"),
)


def cpu_examples(text: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every block right after the marker, in README order."""
    pattern = re.escape(MARKER) + r"\s*\n```(\w+)\n(.*?)```"
    return re.findall(pattern, text, re.S)


def reduce_bash(code: str) -> str:
    """Join continued lines, drop comments and ``pip install`` steps, append size flags."""
    lines = []
    for line in code.replace("\\\n", " ").splitlines():
        line = " ".join(line.split(" #", 1)[0].split())
        parts = [
            p.strip() for p in line.split("&&") if p.strip() and not p.strip().startswith("pip ")
        ]
        for part in parts:
            match = re.match(r"ditq (\w+)\b", part)
            if match:
                part += " " + REDUCED_FLAGS.get(match[1], "")
                if "--build-ref" in part:
                    part += " " + BUILD_REF_FLAGS
            lines.append(part)
    return "set -euo pipefail\n" + "\n".join(lines) + "\n"


def reduce_python(code: str) -> str:
    for pattern, replacement in PYTHON_REDUCTIONS:
        code = re.sub(pattern, replacement, code)
    return code


def test_quick_start_is_two_one_line_commands_install_then_run():
    """The two quick-start commands that CI (``.ci/run``) executes."""
    section = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [c.strip() for c in re.findall(r"```bash\n(.*?)```", section, re.S)]
    assert len(commands) == 2
    assert all("\n" not in c and c.startswith("pip install ") for c in commands)
    assert " ditq " in commands[0] and "pytest" in commands[1]


def test_the_markers_find_the_examples():
    examples = cpu_examples(README.read_text())
    assert [language for language, _ in examples].count("bash") >= 2
    assert any(language == "python" for language, _ in examples)
    reduced = reduce_bash("ditq sample --model m \\\n  --num-samples 100  # note\npip install x")
    expected = f"ditq sample --model m --num-samples 100 {REDUCED_FLAGS['sample']}"
    assert reduced.splitlines()[1] == expected
    assert len(reduced.splitlines()) == 2


@pytest.mark.slow
def test_readme_cpu_examples_run_as_written(tmp_path):
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is not there")
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "shared").symlink_to(SHARED)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DITQ_")}
    env["DITQ_CACHE"] = str(tmp_path / "cache")  # nothing from a user's cache
    for index, (language, code) in enumerate(cpu_examples(README.read_text())):
        if language == "bash":
            command = ["bash", "-c", reduce_bash(code)]
        else:
            command = [sys.executable, "-c", reduce_python(code)]
        result = subprocess.run(
            command, cwd=work, env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, (
            f"example {index} ({language}):\n{code}\n{result.stderr[-3000:]}"
        )

"""The README opens with the two quick-start commands that CI (``.ci/run``) executes."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_start_is_two_one_line_commands_install_then_run():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [c.strip() for c in re.findall(r"```bash\n(.*?)```", section, re.S)]
    assert len(commands) == 2
    assert all("\n" not in c and c.startswith("pip install ") for c in commands)
    assert " ditq " in commands[0] and "pytest" in commands[1]

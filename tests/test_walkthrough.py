"""The README's CPU walkthrough runs as written: its commands, one by one, in an empty folder."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- walkthrough"


def walkthrough_commands() -> list[str]:
    """The commands of the fenced bash block after the walkthrough marker, continuation lines joined."""
    text = README.read_text(encoding="utf-8")
    assert text.count(MARKER) == 1
    block = re.search(r"```bash\n(.*?)```", text.split(MARKER)[1], flags=re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_walkthrough_names_only_commands_the_project_has():
    programs = {shlex.split(command, comments=True)[0] for command in walkthrough_commands()}
    assert programs <= {"python", "motab", "head"}


def test_the_readme_walkthrough_runs(tmp_path):
    # the venv's python and motab first on PATH, as after `. .venv/bin/activate`
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    outputs = []
    for command in walkthrough_commands():
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    toy = tmp_path / "toy"
    line = json.loads((toy / "train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    assert set(line) == {"question", "solution", "answer"}  # the line the README shows
    assert len((toy / "rollouts.jsonl").read_text(encoding="utf-8").splitlines()) == 4
    assert (toy / "rollout.png").stat().st_size > 0
    assert (toy / "run" / "latest").read_text() == "checkpoint-4"
    assert json.loads((toy / "eval" / "results.json").read_text())["benchmarks"]["test"]["problems"] == 50
    # the resolved config is printed with what the tokenizer fills in (EOS, vocabulary size)
    printed = "".join(outputs)
    assert "eos_token_ids: []" not in printed and "vocab_size: null" not in printed
    assert re.search(r"eos_token_ids: \[\d+\]", printed) and re.search(r"vocab_size: \d+", printed)

"""docs/python-api.md's Python blocks run, as written and in order, in an empty folder, and do what the page says."""

import os
import re
import subprocess
import sys
from pathlib import Path

DOC = Path(__file__).parents[2] / "docs" / "python-api.md"
SEPARATOR = "----- next block -----"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_every_python_block_of_the_page_runs(tmp_path):
    blocks = python_blocks()
    assert len(blocks) == 3
    # One interpreter runs the blocks one after another, each in a fresh namespace, as a reader would paste them.
    script = f"\nprint({SEPARATOR!r})\n".join(f"exec({block!r}, {{}})" for block in blocks)
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr
    outputs = [part.strip().splitlines()[-1] for part in result.stdout.split(SEPARATOR)]
    assert outputs[0].startswith("VLBertForPretraining ")
    assert outputs[1].startswith("PretrainingTask ['mlm', 'mvrc', 'mlm_text'] 240 400")
    assert "'mlm/accuracy'" in outputs[2]
    assert (tmp_path / "runs" / "api-demo" / "metrics.jsonl").is_file()

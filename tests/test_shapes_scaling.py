"""The whole-model learning-curve harness (benchmarks/shapes_scaling.py): points, resume,
refusal of another run, the comparison table; and that it trains the shipped model's recipe."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_scaling_harness_points_resume_and_compare(tmp_path):
    out = tmp_path / "large"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "shapes_scaling.py"), "--object-size", "large", "--steps", "3",
           "--points", "2", "--samples", "120", "--eval-prompts", "1", "--eval-questions", "5", "--out", str(out),
           "--threads", "1", "train.global_batch=4", "train.micro_batch=4"]
    done = subprocess.run([*cmd, "--stop-at", "2"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [p["step"] for p in json.loads((out / "scaling.json").read_text())["points"]] == [2]
    # the same command goes on from step 2
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "scaling.json").read_text())
    assert [p["step"] for p in record["points"]] == [2, 3]
    assert json.loads((out / "run" / "config.json").read_text())["train"]["schedule"] == "constant"
    assert json.loads((out / "data" / "manifest.json").read_text())["object_size"] == "large"
    for p in record["points"]:
        for key in ("geneval_overall", "geneval_single_object", "mmbench_overall", "open_shape", "open_colour"):
            assert 0.0 <= p[key] <= 1.0, key
        assert (out / f"model-{p['step']}" / "tokenizer.json").is_file()
    assert (out / "curve.png").is_file() and (out / "grid-3.png").is_file()
    other = subprocess.run([*cmd, "train.lr=1e-4"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert other.returncode != 0 and "holds another run" in other.stderr
    table = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapes_scaling.py"), "compare",
                            str(tmp_path / "fig.png"), str(out)], capture_output=True, text=True, timeout=600)
    assert table.returncode == 0, table.stderr[-2000:]
    rows = [line for line in table.stdout.splitlines() if line.startswith("| large |")]
    assert [r.split("|")[2].strip() for r in rows] == ["2", "3"] and (tmp_path / "fig.png").is_file()

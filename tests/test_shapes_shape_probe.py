"""The shape probes of benchmarks/shapes_shape_probe.py: the classifier learns what is there and
not what is not, and the script runs end to end on a few scenes."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from shapes_shape_probe import fit_probe  # noqa: E402


def test_probe_reads_a_linear_label_and_not_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = x[:, :4].argmax(1)  # four classes, linearly separable
    assert fit_probe(x[:500], y[:500], x[500:], y[500:], 4, epochs=1500) > 0.85
    noise = torch.randint(0, 4, (600,), generator=g)
    assert fit_probe(x[:500], noise[:500], x[500:], noise[500:], 4, epochs=1500) < 0.45


def test_script_runs_on_a_few_scenes():
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapes_shape_probe.py"), "--train", "20",
                           "--test", "10"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("detector after the VAE: shape ")
    assert any(line.startswith("semantic encoder, flattened, MLP: ") for line in lines)
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shapes_shape_probe.py"), "--model", "/nowhere"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "no config.json" in bad.stderr

"""README.md's commands run as written on a fresh clone.

Every command of the README's ``bash`` blocks and every ``python`` block is either run here, in
document order in a scratch folder (with tiny step counts appended where it trains or
evaluates), or listed in ``NEEDS`` with the external thing it needs (released weights, a GPU,
the network, your own data, a running server). A command that is neither fails the suite, so a
new README command gets a test or a stated reason.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

# command -> what it needs that a test cannot have
NEEDS = {
    "python3 -m venv .venv": "the network (pip install)",
    ". .venv/bin/activate": "the network (pip install)",
    "pip install -e .": "the network (pip install)",
    'pip install -e ".[dev]"': "the network (pip install)",
    "python -m pytest -q tests": "is this suite",
    'cheers generate --ckpt /path/to/Cheers --prompt "a photo of a cat" --steps 80 --cfg 9.5 --shift 0.5':
        "the released weights",
    'cheers understand --ckpt /path/to/Cheers --image cat.png --question "What animal is this?"':
        "the released weights",
    "cheers convert /path/to/Cheers outputs/cheers-ours --to cheers": "the released weights",
    "cheers init --llm Qwen2.5-1.5B-Instruct --siglip siglip2-so400m-patch16-512 --vae FLUX.2-vae --out outputs/init":
        "the pretrained Qwen, SigLIP2 and FLUX.2 VAE folders",
    "torchrun --nproc_per_node=8 -m cheers.train --config configs/cheers-1.5b-align.yaml "
    "data.shards=\"['/data/t2i-{000000..000999}.tar']\" data.text_tokenizer_dir=/ckpt/init":
        "8 GPUs, the composed 1.5B model and its data",
    "cheers data check data.jsonl --flavour shapes --tokenizer CKPT": "your data",
    "cheers data pack --jsonl data.jsonl --out shards --shard-size 1000 --workers 8": "your data",
    "python -m cheers.train --config configs/X.yaml data.shards=\"['shards/data-{000000..000009}.tar']\"":
        "your data and recipe",
    "python -m cheers.train --config configs/X.yaml data.shards=[] data.jsonl=\"['data.jsonl']\"":
        "your data and recipe",
    "cheers train --config configs/lora-shapes.yaml \"data.shards=['shards/*.tar']\"": "your data",
    "torchrun --nproc_per_node=8 -m cheers.train --config configs/lora-cheers-1.5b.yaml ...":
        "8 GPUs and the released weights",
    "cheers export outputs/shapes-lora outputs/shapes-lora/adapter": "the LoRA run on your data",
    'cheers generate --ckpt BASE --lora outputs/shapes-lora/adapter --prompt "a photo of a red circle"':
        "the LoRA run on your data",
    "cheers export outputs/shapes-lora outputs/shapes-lora/merged --merge": "the LoRA run on your data",
    "cheers eval geneval generate --metadata evaluation_metadata.jsonl --out outputs/geneval --ckpt CKPT":
        "GenEval's metadata file",
    "cheers eval geneval score outputs/geneval --detector mask2former --detector-config "
    "mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.py --detector-ckpt mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco.pth "
    "--class-names object_names.txt --clip-ckpt ViT-L-14.pt": "Mask2Former and CLIP weights",
    "cheers eval geneval summary outputs/geneval/results.jsonl --out outputs/geneval": "GenEval's scored results",
    "cheers eval dpg generate --prompts ELLA/dpg_bench/prompts --out outputs/dpg --ckpt CKPT": "DPG-Bench's files",
    "cheers eval dpg score outputs/dpg --csv ELLA/dpg_bench/dpg_bench.csv --vqa mplug --vqa-model-dir mplug_large "
    "--out outputs/dpg-report": "DPG-Bench's files and mPLUG",
    "cheers eval mmbench run --tsv MMBench_DEV_EN.tsv --out outputs/mmbench --ckpt CKPT": "MMBench's TSV",
    "cheers eval mmbench score --pred predictions.xlsx --out outputs/mmbench": "a VLMEvalKit predictions file",
    "cheers eval mme run --tsv MME.tsv --out outputs/mme --ckpt CKPT": "MME's TSV",
    "cheers serve --ckpt CKPT --device cuda --weights fp8": "a GPU of compute capability >= 8.9",
    'cheers understand --ckpt CKPT --device cuda --offload model --image x.png --question "..."': "a GPU",
    "python benchmarks/low_memory.py": "minutes (a benchmark, not a check)",
    "cheers serve": "runs until stopped (tests/test_serve*.py serve the same app)",
    "cheers serve --ckpt CKPT --host 0.0.0.0 --port 8000 --api-key KEY": "runs until stopped",
    "curl -s localhost:8000/v1/images/generations -H 'Content-Type: application/json' "
    "-d '{\"prompt\": \"a photo of a red circle\", \"n\": 4, \"seed\": 0, \"response_format\": \"b64_json\"}'":
        "a running server",
    "python: import base64": "a running server and the openai package (the openai client)",
}

# command -> arguments appended to run it in seconds (the same code path with fewer steps)
TINY = {
    "cheers demo --out outputs/shapes-demo": ["--steps", "2", "--finetune-samples", "16", "--eval-prompts", "1",
                                              "--eval-questions", "4", "--word-prompts", "1"],
    "python -m cheers.shapes.dataset --out data/shapes --flavour debug": ["--samples", "48",
                                                                          "--samples-per-shard", "16"],
    "python -m cheers.train --config configs/debug.yaml": ["train.steps=2", "train.ckpt_every=2",
                                                          "data.num_workers=0", "train.fsdp=false"],
    "python -m cheers.shapes.dataset --out outputs/shapes-data --object-size large": ["--samples", "48",
                                                                                      "--samples-per-shard", "16"],
    "cheers quantize --ckpt outputs/shapes-demo/checkpoint --method lcqat --out outputs/shapes-lcqat-ptq":
        ["--samples", "8"],
    "cheers train --config configs/lcqat_shapes.yaml": ["train.steps=2", "train.max_seconds=null",
                                                        "data.shuffle_buffer=8"],
    "cheers eval shapes --out outputs/shapes-eval": ["--steps", "1", "--prompts-per-tag", "1", "--dpg-prompts", "1",
                                                     "--questions", "2", "--max-new-tokens", "2"],
}
# what an interactive command reads from its standard input
STDIN = {"cheers chat --image outputs/gen/00000.png": "What colour is the circle?\n"}
# the commands run without a trained model (seconds each); the rest follow `cheers demo`
QUICK = ("cheers info", "python -m cheers.shapes.dataset --out data/shapes", "python -m cheers.train --config configs/debug",
         "cheers export runs/debug", "cheers generate --ckpt outputs/debug", "python: from cheers.pipeline import Pipeline")


def readme_commands() -> list[tuple[str, str]]:
    """``(kind, command)`` in document order: each command of a ``bash`` block (continuation
    lines joined, comments and ``&&`` chains split), and each ``python`` block whole."""
    out = []
    for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", README.read_text(), re.S | re.M):
        if lang == "python":
            out.append(("python", body))
        elif lang == "bash":
            for line in re.sub(r"\\\n\s*", "", body).splitlines():
                line = re.sub(r"(^|\s+)#\s.*$", "", line).strip()
                out += [("bash", cmd.strip()) for cmd in line.split(" && ") if line]
    return out


def key(kind: str, command: str) -> str:
    """A python block is named by its first line, a shell command by itself."""
    return f"python: {command.splitlines()[0]}" if kind == "python" else command


def test_every_readme_command_is_run_or_says_what_it_needs():
    keys = [key(k, c) for k, c in readme_commands()]
    unlisted = [k for k in keys if k not in NEEDS and not k.startswith(RUN)]
    assert not unlisted, f"README commands neither run by tests/test_readme.py nor listed in NEEDS: {unlisted}"
    stale = [k for k in [*NEEDS, *TINY, *STDIN] if k not in keys]
    assert not stale, f"listed in tests/test_readme.py but not in README.md: {stale}"


# every command the test runs begins with one of these
RUN = ("cheers demo", "cheers generate", "cheers understand", "cheers chat", "cheers info", "python -m cheers.shapes.dataset",
       "python -m cheers.train --config configs/debug", "cheers export runs/debug", "cheers quantize", "cheers train",
       "cheers eval shapes", "python: from cheers.pipeline import Pipeline")


def _run_readme(tmp_path: Path, quick: bool) -> None:
    """Run the README's commands that ``quick`` selects, in order, in ``tmp_path``."""
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = dict(os.environ, CHEERS_HOME=str(tmp_path / "home"), PYTHONPATH=os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cheers = [sys.executable, "-c", "import sys; from cheers.cli import main; main(sys.argv[1:])"]
    ran = 0
    for kind, command in readme_commands():
        name = key(kind, command)
        if name in NEEDS or name.startswith(QUICK) != quick:
            continue
        if kind == "python":
            argv = [sys.executable, "-c", command]
        else:
            words = __import__("shlex").split(command) + TINY.get(command, [])
            argv = (cheers + words[1:] if words[0] == "cheers"
                    else [sys.executable] + words[1:] if words[0] == "python" else words)
        res = subprocess.run(argv, cwd=tmp_path, env=env, input=STDIN.get(command, ""), capture_output=True,
                             text=True, timeout=900)
        assert res.returncode == 0, f"README command failed: {name}\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"
        ran += 1
    assert ran


@pytest.mark.slow
def test_readme_commands_without_the_demo(tmp_path):
    """The recipe-free commands: the parameter table, the Python snippet on the shipped model,
    and the debug flavour's data, training run, export and generation."""
    _run_readme(tmp_path, quick=True)
    assert (tmp_path / "outputs" / "debug" / "tokenizer.json").is_file()
    assert (tmp_path / "outputs" / "debug-gen" / "00000.png").is_file()


@pytest.mark.slow
def test_readme_commands_after_the_demo(tmp_path):
    """The demo (tiny), then everything that reads its checkpoint: generate, understand,
    evaluation, 2-bit quantization and QAT, int8 weights."""
    _run_readme(tmp_path, quick=False)
    assert (tmp_path / "outputs" / "gen" / "00003.png").is_file()
    assert (tmp_path / "outputs" / "shapes-eval" / "summary.json").is_file()

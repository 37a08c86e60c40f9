"""The shapes demo's report: sample grids, loss curves and the HTML page."""

from __future__ import annotations

import html
import json
from pathlib import Path

from PIL import Image, ImageDraw


def write_grid(samples, path: Path, per_row: int = 4, cell: int = 96) -> None:
    """Generated images with their prompts, one prompt per row."""
    rows = samples[: min(len(samples), 24)]
    label_w = 300
    grid = Image.new("RGB", (label_w + per_row * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, (meta, images) in enumerate(rows):
        draw.text((6, r * cell + cell // 2 - 12), f"[{meta['tag']}]\n{meta['prompt']}"[:90], fill="black")
        for k, img in enumerate(images[:per_row]):
            grid.paste(img.resize((cell - 4, cell - 4), Image.NEAREST), (label_w + k * cell + 2, r * cell + 2))
    grid.save(path)


def write_loss_plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [h["step"] for h in history]
    for key in ("loss", "ce", "flow"):
        if history and key in history[0]:
            ax.plot(steps, [h[key] for h in history], label=key)
    ax.set_xlabel("step")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("Cheers training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _flat(result: dict | None) -> dict:
    """The figures of one evaluation, by name."""
    if result is None:
        return {}
    row = dict(result["row"])
    if "new_word" in result:
        row["new word drawn in its colour"] = result["new_word"]["word"]
        row["the colour's own name drawn"] = result["new_word"]["colour"]
    return row


# the figures the page's table shows first, in this order
HEADLINE = ("geneval_overall", "geneval_single_object", "geneval_two_object", "geneval_colors", "geneval_counting",
            "geneval_position", "geneval_color_attr", "shape_right", "colour_right", "coherent", "mmbench_overall",
            "mmbench_shape", "mmbench_colour", "mmbench_count", "mmbench_position", "mmbench_existence",
            "open_shape", "open_colour", "open_count", "new word drawn in its colour", "the colour's own name drawn")


def write_report(out: Path, run: dict, *, seed: int, minutes: float) -> dict:
    """metrics.json, grid.png (after), new-word.png (before / after), loss.png and index.html for a
    demo ``run`` (``cheers.shapes.demo``); returns the metrics."""
    before, after = _flat(run["before"]), _flat(run["after"])
    names = [k for k in HEADLINE if k in after] + sorted(k for k in after if k not in HEADLINE)
    metrics = {"what": run["what"], "object_size": run["object_size"], "steps": run["steps"],
               "before": before or None, "after": after, "seed": seed, "wall_minutes": minutes,
               "train": {"final": run["history"][-1] if run["history"] else {}}}
    head = f"GenEval overall {after['geneval_overall']:.3f}, MMBench CircularEval {after['mmbench_overall']:.3f}"
    if before:
        head = (f"GenEval overall {before['geneval_overall']:.3f} -> {after['geneval_overall']:.3f}, MMBench "
                f"{before['mmbench_overall']:.3f} -> {after['mmbench_overall']:.3f}, the new word drawn in its "
                f"colour {before['new word drawn in its colour']:.3f} -> {after['new word drawn in its colour']:.3f}")
    metrics["summary"] = f"{run['what']}: {head}; {minutes:.1f} minutes in all."
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    by_tag: dict[str, list] = {}
    for sample in run["after"]["samples"]:
        by_tag.setdefault(sample[0]["tag"], []).append(sample)
    write_grid([s for group in by_tag.values() for s in group[:4]], out / "grid.png")  # 4 prompts per tag
    if run["before"] is not None:
        pairs = [(m, b[:2] + a[:2]) for (m, b), (_, a) in zip(run["before"]["new_word"]["samples"],
                                                              run["after"]["new_word"]["samples"])]
        write_grid(pairs[:8], out / "new-word.png")
    write_loss_plot(run["history"], out / "loss.png")
    cells = lambda d, k: f"<td>{d[k]:.3f}</td>" if k in d and d[k] == d[k] else "<td>-</td>"  # noqa: E731
    rows = "".join(f"<tr><td>{html.escape(k)}</td>{cells(before, k) if before else ''}{cells(after, k)}</tr>"
                   for k in names)
    columns = "<th>before</th><th>after</th>" if before else "<th>trained</th>"
    word = ("<h2>The new word (prompts it never saw: 2 images before, 2 after)</h2>"
            '<img src="new-word.png" alt="new-word prompts before and after">') if before else ""
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cheers shapes demo</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}td,th{{padding:2px 10px;text-align:left}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>cheers: the shapes-world demo</h1>
<p>{html.escape(metrics['summary'])}</p>
<h2>Held-out scores</h2>
<p>GenEval: the shapes detector with GenEval's rules, 4 images a prompt. shape_right / colour_right: the largest
object's shape (single-object prompts) and colour (colors prompts); coherent: single-object images with exactly one
object. MMBench: CircularEval. open_*: questions without options, the answer's first word.</p>
<table><tr><th>measure</th>{columns}</tr>{rows}</table>
{word}
<h2>Generated images</h2><img src="grid.png" alt="generated images with their prompts">
<h2>Loss curve</h2><img src="loss.png" alt="loss curves">
<h2>Going on</h2><pre>cheers generate --ckpt {html.escape(str(out / 'checkpoint'))} --prompt "a photo of a scarlet star"
cheers serve --ckpt {html.escape(str(out / 'checkpoint'))}
cheers train --config shapes train.init_from={html.escape(str(out / 'checkpoint'))} ...</pre>
</body></html>"""
    (out / "index.html").write_text(page)
    return metrics

"""Does the omni model look at the picture, or at a trick of it? Image answers on pictures whose
top-left pixel alone is repainted in its complement colour (one pixel of 4,096), beside the same
questions on the pictures as they are.

    python bench/bench_repaint.py [--ckpt checkpoints/omni_sft_tiny] [--manifest data/demo/sft_test.jsonl]
                                  [--limit 80]

Takes the first `--limit` image questions of the manifest, writes the repainted copies of their
pictures and a manifest of each version into a temporary folder, scores both with
`python -m omni.evaluate` and prints image accuracy (all and per topic) side by side. A model that
reads the picture answers both the same to within a question or two; one that keyed on a pixel
(say, the background colour at a corner) falls apart. docs/stage_e_sft.md holds the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from omni.cli import run_cli  # noqa: E402
from omni.config import UserError  # noqa: E402
from omni.data.sft import read_sft_manifest  # noqa: E402


def repaint_corner(src: str, dst: str) -> None:
    """Copy the picture with its top-left pixel in the complement colour (255 - each channel)."""
    with Image.open(src) as im:
        img = im.convert("RGB")
    r, g, b = img.getpixel((0, 0))
    img.putpixel((0, 0), (255 - r, 255 - g, 255 - b))
    img.save(dst, format="PNG")


def image_scores(ckpt: str, manifest: str) -> dict:
    """omni.evaluate's image figures of the checkpoint on one manifest."""
    proc = subprocess.run([sys.executable, "-m", "omni.evaluate", "--ckpt", ckpt, "--manifest", manifest, "--json"],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise UserError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "omni.evaluate failed")
    scores = json.loads(proc.stdout.strip().splitlines()[-1])
    return {k.removeprefix("val_"): v for k, v in scores.items() if k.startswith("val_image")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Image answers with one pixel of each picture repainted.")
    p.add_argument("--ckpt", default="checkpoints/omni_sft_tiny", help="a Stage E folder or export")
    p.add_argument("--manifest", default="data/demo/sft_test.jsonl", help="SFT records with image questions")
    p.add_argument("--limit", type=int, default=80, help="image questions to ask (the manifest's first)")
    args = p.parse_args(argv)
    records = [r for r in read_sft_manifest(args.manifest) if "image" in r][:args.limit]
    if not records:
        raise UserError(f"{args.manifest}: no records with an image")
    with tempfile.TemporaryDirectory() as tmp:
        rows = {"as it is": [], "top-left pixel repainted": []}
        for i, record in enumerate(records):
            copy = os.path.join(tmp, f"{i:05d}.png")
            repaint_corner(record["image"], copy)
            kept = {**{k: v for k, v in record.items() if not k.startswith("_")},
                    "image": os.path.abspath(record["image"])}
            rows["as it is"].append(kept)
            rows["top-left pixel repainted"].append({**kept, "image": copy})
        scores = {}
        for name, rs in rows.items():
            path = os.path.join(tmp, f"{len(scores)}.jsonl")
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rs)
            scores[name] = image_scores(args.ckpt, path)
    names = sorted(set().union(*scores.values()))
    print(f"{len(records)} image questions of {args.manifest}, {args.ckpt}")
    print(f"{'figure':<20}" + "".join(f"{n:>28}" for n in scores))
    for key in names:
        print(f"{key:<20}" + "".join(f"{100 * s.get(key, float('nan')):>27.1f}%" for s in scores.values()))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))

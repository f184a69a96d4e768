"""Talk to a trained model. See docs/inference.md.

    python infer.py --ckpt_dir checkpoints/thinker_tiny --text "a red circle"
"""
from __future__ import annotations

import argparse
import sys

from omni.inference import generate_text, load_thinker
from omni.runtime import resolve_device
from omni.training_utils import run_cli


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Generate with a trained μOmni model.")
    p.add_argument("--ckpt_dir", default="checkpoints/thinker_tiny", help="folder of the Thinker checkpoints")
    p.add_argument("--text", required=True, help="the prompt")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_k", type=int, default=0, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    model, tokenizer = load_thinker(args.ckpt_dir, device)
    for piece in generate_text(model, tokenizer, args.text, args.max_new_tokens, args.temperature,
                               args.top_k, args.seed, device):
        print(piece, end="", flush=True)
    print()
    return 0


if __name__ == "__main__":
    run_cli(lambda: main(sys.argv[1:]))

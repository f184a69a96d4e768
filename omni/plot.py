"""Loss and metric curves of a run: `python -m omni.plot SAVE_DIR [SAVE_DIR ...]`.

Reads SAVE_DIR/metrics.jsonl and writes SAVE_DIR/curves.png: training and validation loss on the
left, the other validation metrics on the right. Needs matplotlib (an optional dependency).
"""
from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")          # files only: no screen needed
import matplotlib.pyplot as plt  # noqa: E402

from omni.cli import run_cli  # noqa: E402
from omni.config import UserError  # noqa: E402
from omni.logs import METRICS_FILE, read_records  # noqa: E402

SKIP = {"step", "split", "val_loss", "lr", "skipped_samples", "steps_per_s", "grad_norm"}


def read_metrics(save_dir: str) -> tuple[list[dict], list[dict]]:
    path = os.path.join(save_dir, METRICS_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no {METRICS_FILE} in {save_dir}")
    rows = read_records(path)
    return [r for r in rows if r.get("split") == "train"], [r for r in rows if r.get("split") == "val"]


def plot_run(save_dir: str) -> str:
    train, val = read_metrics(save_dir)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if val:
        left.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val loss")
    left.set_xlabel("step")
    left.set_title("loss")
    left.legend()
    names = sorted({k for r in val for k, v in r.items() if k not in SKIP and isinstance(v, (int, float))})
    for name in names:
        points = [(r["step"], r[name]) for r in val if name in r]
        right.plot([s for s, _ in points], [v for _, v in points], "o-", label=name)
    right.set_xlabel("step")
    right.set_title("validation metrics")
    if names:
        right.legend(fontsize="small")
    fig.suptitle(os.path.basename(os.path.normpath(save_dir)))
    fig.tight_layout()
    out = os.path.join(save_dir, "curves.png")
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Draw loss and metric curves of runs.")
    p.add_argument("save_dirs", nargs="+")
    for save_dir in p.parse_args(argv).save_dirs:
        print(plot_run(save_dir))
    return 0


if __name__ == "__main__":
    run_cli(main)

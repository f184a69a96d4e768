"""The command line every trainer shares: `python train_X.py --config FILE [--set key=value ...]
[--no-resume] [--resume_step N] [--init_from PATH]` (docs/design.md, command-line conventions)."""
from __future__ import annotations

import argparse
import os
import sys

from omni.cli import run_cli
from omni.config import load_config
from omni.train.loop import ResumeOptions, train


def trainer_main(stage_class, argv=None) -> None:
    """The command line every trainer shares (docs/design.md, command-line conventions)."""
    parser = argparse.ArgumentParser(description=f"Train the {stage_class.spec.prefix} stage.")
    parser.add_argument("--config", help="JSON config file (defaults to the built-in values)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (repeatable, type-checked)")
    parser.add_argument("--no-resume", dest="resume", action="store_false",
                        help="start a new run at step 0; an earlier run's files in save_dir are moved to "
                             "save_dir/replaced/<date-time>/ (nothing is deleted)")
    parser.add_argument("--resume_step", type=int,
                        help="branch from {prefix}_step_N.pt: the old run's files after step N are moved to "
                             "save_dir/replaced/<date-time>/")
    parser.add_argument("--init_from", help="load weights only (any format); fresh optimizer at step 0; a new run, "
                                            "as with --no-resume")
    args = parser.parse_args(argv)

    def main():
        cfg = load_config(stage_class.config_class, args.config, args.set)
        return train(stage_class, cfg, ResumeOptions(args.resume, args.resume_step, args.init_from))
    try:
        run_cli(main)
    except SystemExit as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # Under torchrun the interpreter's exit can abort in torch's C++ teardown (std::terminate,
            # about one run in 15 on Gloo after DCP saves), after every file is written: leave
            # without running C++ static destructors, so the exit status stays the run's.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(e.code if isinstance(e.code, int) else 1)
        raise

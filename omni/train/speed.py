"""Speed options of the training core that leave the checkpoints as they are: `compile_modules`
(config key `compile`; compiled kernels may round differently in the last bits). Figures, and
what did not pay: docs/bench.md."""
from __future__ import annotations

from omni.train.stage import Stage


def compile_modules(stage: Stage, cfg, **options) -> None:
    """With cfg.compile, compile the forward of every module of the stage in place
    (`nn.Module.compile`, options as for torch.compile). The modules stay the same objects, so
    their state_dict keys, and the checkpoints, are those of an eager run (no `_orig_mod.`)."""
    if not cfg.compile:
        return
    for module in stage.modules.values():
        module.compile(**options)

"""How a stage's modules train on several ranks, through PyTorch's own engines (docs/training.md).

  one rank       the stage's loss is called as it is
  parallel=ddp   DistributedDataParallel over all the stage's modules: bucketed gradient all-reduce
                 overlapped with backward, skipped (no_sync) on all but the last micro-batch
  parallel=fsdp  FSDP2 (`fully_shard`): every transformer block is its own unit, the rest one root
                 unit; parameters, gradients and optimizer state are sharded over the ranks

Either way the stage's `loss(batch)` runs inside `StageModel.forward`, so the engine's hooks see
every forward. Modules that do not train (requires_grad False) are never reduced.
"""
from __future__ import annotations

import contextlib

import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from omni.config import UserError
from omni.layers import Block
from omni.registry import sharded
from omni.train.stage import Stage


class StageModel(nn.Module):
    """All of a stage's modules as one module whose forward is the stage's training loss."""

    def __init__(self, stage: Stage):
        super().__init__()
        self.parts = nn.ModuleDict(stage.modules)
        self.stage = [stage]          # a list: not registered as a submodule

    def forward(self, batch):
        return self.stage[0].loss(batch)


class Parallel:
    """The stage's modules as the training step sees them: `loss(batch)`, `accumulating()` for the
    micro-batches whose gradients are not reduced yet, and `evaluating()` around validation."""

    def __init__(self, stage: Stage, mode: str, folders: bool = False):
        self.stage, self.mode = stage, mode
        # parallel=fsdp checkpoints its steps as DCP folders on any number of ranks, one included,
        # so that a run can move between 1 and N ranks and keep one format
        self.folders = folders
        self.root = StageModel(stage)
        self.engine = self.root
        if mode == "ddp":
            # broadcast_buffers off: buffers that must agree (RVQ codebooks) are kept so by their own stage
            self.engine = DistributedDataParallel(self.root, broadcast_buffers=False, find_unused_parameters=True)
        elif mode == "fsdp":
            from torch.distributed.fsdp import fully_shard  # optional: only torchrun runs need it
            for module in self.root.modules():
                if isinstance(module, Block) and any(p.requires_grad for p in module.parameters()):
                    fully_shard(module)
            fully_shard(self.root)

    def loss(self, batch):
        return self.engine(batch)

    def accumulating(self):
        """Context of a micro-batch that is not the step's last: DDP keeps its gradients local."""
        return self.engine.no_sync() if self.mode == "ddp" else contextlib.nullcontext()

    @contextlib.contextmanager
    def evaluating(self):
        """Validation and generation call the modules directly: FSDP gathers the root unit first
        (the blocks gather themselves when called)."""
        if self.mode == "fsdp":
            self.root.unshard()
        try:
            yield
        finally:
            if self.mode == "fsdp":
                self.root.reshard()


def parallelize(stage: Stage, mode: str, world_size: int) -> Parallel:
    """Wrap the stage's modules (already on their device, the same on every rank) for training."""
    if mode == "fsdp" and not stage.spec.sharded:      # omni/registry.py: StageSpec.sharded
        raise UserError(f"config key 'parallel': fsdp shards stages {', '.join(sharded())}; stage "
                        f"{stage.spec.letter} ({stage.spec.prefix}) trains with parallel=ddp")
    return Parallel(stage, mode if world_size > 1 else "none", folders=mode == "fsdp")

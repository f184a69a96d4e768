"""Where training runs: device, torchrun ranks, AMP, and RNG state capture.

Started by `torchrun`, the environment holds WORLD_SIZE/RANK/LOCAL_RANK and every process joins
one process group (NCCL on CUDA, Gloo on CPU). How the modules are wrapped for several ranks
(DistributedDataParallel or FSDP2) is omni/train/parallel.py.
"""
from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import torch
import torch.distributed as dist

from omni.config import UserError


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        """Sum a list of numbers over all ranks."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def largest(self, value: int) -> int:
        """The largest of one integer over all ranks."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def broadcast_parameters(self, modules):
        """Make every rank start from rank 0's weights."""
        if self.distributed:
            for module in modules:
                for t in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(t.data, src=0)

    def gather_rng(self) -> list[dict]:
        """RNG states of every rank (a collective call: every rank must take part)."""
        state = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        elif self.device.type == "mps":
            state["mps"] = torch.mps.get_rng_state()
        if not self.distributed:
            return [state]
        states = [None] * self.world_size
        dist.all_gather_object(states, state)
        return states

    def restore_rng(self, states: list[dict], reseed: int) -> bool:
        """Restore this rank's RNG state; from a checkpoint of another world size, whose states do
        not map onto these ranks, seed this rank's generators with `reseed` and return False."""
        if len(states) != self.world_size:
            torch.manual_seed(reseed)
            random.seed(reseed)
            return False
        state = states[self.rank]
        torch.set_rng_state(state["torch"].cpu())
        random.setstate(state["python"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"].cpu(), self.device)
        if "mps" in state and self.device.type == "mps":
            torch.mps.set_rng_state(state["mps"].cpu())
        return True


def mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)      # absent from some builds
    return bool(mps and mps.is_available())


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The device for config value `name`: auto picks CUDA, then Apple's MPS, then the CPU."""
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("config key 'device': cuda requested but no CUDA device is available")
    if name == "mps" and not mps_available():
        raise UserError("config key 'device': mps requested but this torch has no usable MPS device "
                        "(Apple silicon with a macOS build of torch)")
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    if name == "mps" or (name == "auto" and mps_available()):
        return torch.device("mps")
    return torch.device("cpu")


def setup_runtime(cfg) -> Runtime:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if device.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    if device.type == "mps" and world > 1:
        raise UserError("config key 'device': mps runs one process; start without torchrun (or use cpu)")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    if amp is torch.float16 and device.type != "cuda":
        # GradScaler is the CUDA path the suite tests; bf16 needs no scaler.
        raise UserError(f"config key 'amp': fp16 needs a CUDA device; use amp=bf16 on {device.type}")
    return Runtime(device=device, rank=rank, world_size=world, amp_dtype=amp)


def teardown(rt: Runtime):
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()

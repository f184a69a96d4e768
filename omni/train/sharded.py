"""Sharded step checkpoints (parallel=fsdp): a torch.distributed.checkpoint (DCP) folder.

  {prefix}_step_{N}.dcp/
    __{r}_0.distcp   rank r's shards of the weights and the AdamW moments (DCP's files)
    .metadata        DCP's index of every shard, written by rank 0 once all ranks have written
    trainer.pt       the rest of the state: step, best_val_loss, config, schedule, scaler, every
                     rank's RNG, the data position and AdamW's param groups (a plain dictionary)

The folder is written as `.{name}.tmp` and committed by one rename after `.metadata` and
trainer.pt are on disk, so a folder under its real name is whole; a temporary one is never read
(and is deleted at the next start). A write that fails on any rank (a full disk) stops every rank
with one line, the temporary folder removed. DCP reshards on load: a run resumes on any number of ranks.

Only tensors go into the shards, and `.metadata` (a pickle) is read by an unpickler that knows
DCP's own index classes and nothing else: loading a folder cannot run code.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, StorageMeta
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from omni import checkpoint as ckpt
from omni.runtime import Runtime

TRAINER_FILE, METADATA_FILE, PARAM_GROUPS = "trainer.pt", ".metadata", "param_groups"
_INDEX_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_INDEX_NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                ("pathlib", "Path"), ("collections", "OrderedDict")}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in _INDEX_MODULES or (module, name) in _INDEX_NAMES or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused: the index names {module}.{name}, which a DCP index never holds")


def read_index(folder: str):
    """DCP's index of a folder, read safely; CheckpointError says why it cannot be used."""
    try:
        with open(os.path.join(folder, METADATA_FILE), "rb") as f:
            index = _IndexUnpickler(f).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, ValueError, TypeError) as e:
        raise ckpt.CheckpointError(f"{folder}: unreadable shard index: {e}") from None
    if any(isinstance(m, BytesStorageMetadata) for m in index.state_dict_metadata.values()):
        raise ckpt.CheckpointError(f"{folder}: refused: it holds pickled Python objects, not only tensors")
    return index


class SafeReader(dcp.FileSystemReader):
    """DCP's file reader with the index read by `read_index` (tensors it loads with weights_only)."""

    def read_metadata(self, *args, **kwargs):
        index = read_index(str(self.path))
        index.storage_meta = index.storage_meta or StorageMeta()
        index.storage_meta.load_id = self.load_id
        return index


def check_folder(folder: str) -> dict:
    """The trainer.pt of a committed folder whose shards are all on disk at their full length."""
    extras = ckpt.load(os.path.join(folder, TRAINER_FILE))
    for info in read_index(folder).storage_data.values():
        path = os.path.join(folder, info.relative_path)
        if not os.path.isfile(path) or os.path.getsize(path) < info.offset + info.length:
            raise ckpt.CheckpointError(f"{folder}: shard file {info.relative_path} is missing or truncated")
    return extras


def _tensors(root: torch.nn.Module, optimizer) -> tuple[dict, list]:
    """This rank's weights and AdamW moments keyed by parameter name, and the param groups."""
    model, optim = get_state_dict(root, optimizer)
    return {"model": model, "optimizer": optim["state"]}, optim[PARAM_GROUPS]


def save_folder(path: str, root: torch.nn.Module, optimizer, extras: dict, rt: Runtime) -> None:
    """Write a step folder from every rank (a collective call) and commit it on rank 0.

    A write that fails on any rank (a full disk) fails on every rank alike, with the same
    CheckpointError line as a single file's (`ckpt.write_failure`): the temporary folder is
    removed and the folders already there are untouched, and no rank is left waiting for another.
    """
    tmp = ckpt.hidden_beside(path, ".tmp")
    if rt.is_main and os.path.exists(tmp):
        ckpt.remove(tmp)
    rt.barrier()
    tensors, groups = _tensors(root, optimizer)
    failure = None
    try:
        # rank 0 writes .metadata once every rank's shards are written; a rank's failure is raised
        # on every rank as a CheckpointException
        with single_process_quietly():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(tmp), no_dist=not rt.distributed)
    except CheckpointException as e:
        failure = _write_failure(e, path)
    if failure is None and rt.is_main:
        try:
            ckpt.save(os.path.join(tmp, TRAINER_FILE), {**extras, PARAM_GROUPS: groups})
            ckpt.commit(tmp, path)         # over the same step saved before by a resumed run, if any
        except ckpt.WriteFailed as e:          # named after the step folder, not its temporary trainer.pt
            failure = str(ckpt.write_failure(e.error, path))
        except OSError as e:
            failure = str(ckpt.write_failure(e, path))
    failure = _first_of_ranks(failure, rt)     # also the barrier after the commit
    if failure is not None:
        if rt.is_main and os.path.exists(tmp):
            ckpt.remove(tmp)
        raise ckpt.CheckpointError(failure)


@contextlib.contextmanager
def single_process_quietly():
    """DCP warns at every save and load in one process that it assumes one process: no_dist asks for
    just that, and the warning would be the only line besides a one-line error."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _write_failure(error: CheckpointException, path: str) -> str:
    """The one line of a failed DCP save: the first rank's OSError, worded as a file's would be.
    A failure that is not an OSError is a bug, raised as it came."""
    for exc, _trace in error.failures.values():
        if isinstance(exc, OSError):
            return str(ckpt.write_failure(exc, path))
    raise error


def _first_of_ranks(message: str | None, rt: Runtime) -> str | None:
    """The message of the lowest rank that has one, on every rank (a collective call)."""
    if not rt.distributed:
        return message
    messages = [None] * rt.world_size
    dist.all_gather_object(messages, message)
    return next((m for m in messages if m is not None), None)


def load_folder(folder: str, root: torch.nn.Module, optimizer, extras: dict) -> None:
    """Fill the modules and the optimizer, as they are sharded now, from a step folder."""
    tensors, _ = _tensors(root, optimizer)
    with single_process_quietly():
        dcp.load(tensors, storage_reader=SafeReader(folder), no_dist=not dist.is_initialized())
    set_state_dict(root, optimizer, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer"], PARAM_GROUPS: extras[PARAM_GROUPS]})


def full_weights(root: torch.nn.Module, keys) -> dict[str, dict]:
    """Every module's whole state_dict on rank 0 (empty elsewhere), gathered from the shards."""
    flat = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {key: {name[len(key) + 7:]: t for name, t in flat.items() if name.startswith(f"parts.{key}.")}
            for key in keys}

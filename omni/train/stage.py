"""What a training stage supplies to the shared loop (`Stage`), and the data-loading helpers the
loop and the stages share: batches to the device, bad samples dropped and reported, DataLoader
workers that leave stop signals to the main process.

A stage (omni/stages/*.py) subclasses `Stage`; the loop that runs it is omni/train/loop.py.
"""
from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from omni.config import TrainConfig
from omni.data.manifest import SkippedSample
from omni.data.sampler import ShuffledBatches
from omni.registry import StageSpec
from omni.runtime import Runtime


class Stage:
    """What one training stage supplies to the shared loop. Subclasses set `spec` (their identity
    in omni/registry.py: prefix, weight keys, command) and `config_class`, and fill `modules` (exactly
    the spec's weight keys, plus any of its optional keys), `train_data` and `val_data` in `setup()`,
    and `test_data` when its spec's splits hold "test" and its config names a test manifest."""
    spec: StageSpec                  # e.g. STAGES["A"]
    config_class = TrainConfig
    val_key = "val_manifest"         # the config key of the validation data (omni.evaluate replaces it)
    test_data: Dataset | None = None     # the held-out split its evaluate() also scores (bad samples counted)

    def __init__(self, cfg, rt: Runtime, evaluation_only: bool = False):
        self.cfg, self.rt = cfg, rt
        self.modules: dict[str, torch.nn.Module] = {}   # weight key -> module, all saved
        self.train_data = self.val_data = None
        # Built to score a checkpoint (omni.evaluate): setup() then neither needs nor reads the
        # training data, train_data stays None, and metrics derived from the training data are left out.
        self.evaluation_only = evaluation_only

    def setup(self) -> None:
        raise NotImplementedError

    def batch_plan(self):
        return ShuffledBatches(len(self.train_data), self.cfg.batch_size, self.cfg.seed)

    def collate(self, samples):
        return default_collate(samples)

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """Mean loss of a batch, and metrics to log (numbers; keys 'n_*' are counts summed into rates)."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """Validation metrics; must hold 'val_loss', which decides the best checkpoint."""
        return {"val_loss": self.mean_loss(self.val_data)}

    # Helpers for stages -----------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters() if p.requires_grad]

    def eval_batches(self, dataset):
        """This rank's share of the validation set, in order, as device batches."""
        b, n = self.cfg.batch_size, len(dataset)
        batches = [[(i, 0) for i in range(s, min(s + b, n))] for s in range(0, n, b)]
        if self.cfg.eval_batches:
            batches = batches[:self.cfg.eval_batches]
        loader = make_loader(dataset, batches[self.rt.rank::self.rt.world_size], self, workers=0)
        for batch, _ in loader:
            if batch is not None:
                yield to_device(batch, self.rt.device)

    def mean_loss(self, dataset) -> float:
        total = count = 0.0
        for batch in self.eval_batches(dataset):
            with self.rt.autocast():
                loss, _ = self.loss(batch)
            n = batch_size_of(batch)
            total, count = total + loss.item() * n, count + n
        total, count = self.rt.sum([total, count])
        return total / max(count, 1)


def batch_size_of(batch) -> int:
    """Samples in a batch: a tensor's first dimension, a dict's or tuple's first entry's, a list's length."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    return batch_size_of(batch[0]) if isinstance(batch, tuple) else len(batch)


def to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class SkipBadSamples:
    """Collate that drops the samples a dataset could not load (None, or a SkippedSample saying
    why) and returns (batch, or None when none is left; descriptions of the dropped ones)."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, samples):
        good = [s for s in samples if s is not None and not isinstance(s, SkippedSample)]
        dropped = [s.message if isinstance(s, SkippedSample) else "a sample" for s in samples
                   if s is None or isinstance(s, SkippedSample)]
        return (self.collate(good) if good else None), dropped


def ignore_stop_signals(_worker_id: int) -> None:
    # A SIGTERM sent to the whole process group (pkill, a scheduler pre-empting the job) or Ctrl-C
    # must reach only the main process, which saves and exits; a worker killed by it would make the
    # main process fail before it can save.
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, signal.SIG_IGN)


def make_loader(dataset, batch_sampler, stage: Stage, workers: int | None = None) -> DataLoader:
    workers = stage.cfg.num_workers if workers is None else workers
    # A private generator: creating a loader must not draw from the global RNG, or a resumed run
    # (which creates its loader at another point) would diverge from an uninterrupted one.
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=SkipBadSamples(stage.collate),
                      num_workers=workers, pin_memory=stage.rt.device.type == "cuda",
                      worker_init_fn=ignore_stop_signals if workers else None,
                      generator=torch.Generator().manual_seed(stage.cfg.seed))

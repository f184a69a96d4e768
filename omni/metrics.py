"""Evaluation metrics shared by the stages: edit distance, CER / WER, retrieval accuracy,
attribute probes.

CER and WER are corpus-level: total edits over total reference length (characters or words),
so long utterances weigh more than short ones, as in the usual ASR reports. The counting
functions return (edits, length) pairs so distributed evaluation can sum them over ranks.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    """Levenshtein distance (substitutions, insertions, deletions each cost 1)."""
    if len(ref) < len(hyp):          # keep the row short: memory O(min(len))
        ref, hyp = hyp, ref
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        diag, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diag + (r != h))
    return row[-1]


def _as_list(x) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def error_counts(refs, hyps, unit: str = "char") -> tuple[int, int]:
    """(total edits, total reference length) over pairs of strings; unit is 'char' or 'word'."""
    refs, hyps = _as_list(refs), _as_list(hyps)
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    split = (lambda s: s.split()) if unit == "word" else (lambda s: s)
    edits = total = 0
    for ref, hyp in zip(refs, hyps):
        r, h = split(ref), split(hyp)
        edits += edit_distance(r, h)
        total += len(r)
    return edits, total


def cer(refs, hyps) -> float:
    """Character error rate: character edits / reference characters (spaces count)."""
    edits, total = error_counts(refs, hyps, "char")
    return edits / max(total, 1)


def wer(refs, hyps) -> float:
    """Word error rate: word edits / reference words."""
    edits, total = error_counts(refs, hyps, "word")
    return edits / max(total, 1)


def retrieval_hits(sim: torch.Tensor, same: torch.Tensor) -> tuple[int, int]:
    """Top-1 hits (image->caption, caption->image) in one gallery.

    sim [N, N]: similarity of image i and caption j. same [N, N] bool: caption j describes image i
    (True for identical captions too, so retrieving a duplicate caption counts as right).
    """
    rows = torch.arange(sim.shape[0], device=sim.device)
    i2t = same[rows, sim.argmax(dim=1)].sum()
    t2i = same[sim.argmax(dim=0), rows].sum()
    return int(i2t), int(t2i)


def retrieval_accuracy(sim: torch.Tensor, same: torch.Tensor) -> tuple[float, float]:
    """Top-1 accuracy (image->caption, caption->image) in one gallery; see retrieval_hits."""
    i2t, t2i = retrieval_hits(sim, same)
    n = max(sim.shape[0], 1)
    return i2t / n, t2i / n


def parse_probe_groups(specs: list[str], key: str = "probe_groups") -> dict[str, list[list[str]]]:
    """["shape=circle|square", "relation=above|left of"] -> {"shape": [["circle"], ["square"]], ...}:
    named groups of interchangeable words or phrases."""
    groups = {}
    for spec in specs:
        name, _, members = spec.partition("=")
        options = [m.split() for m in members.split("|") if m.strip()]
        if not name.strip() or len(options) < 2:
            raise ValueError(f"{key}: {spec!r} is not name=word|word[|...] with two or more choices")
        groups[name.strip()] = options
    return groups


def swap_probes(words: list[str], options: list[list[str]]) -> list[list[list[str]]]:
    """For each place where one of the options occurs in the caption (words), the candidate list
    [the caption, the caption with that occurrence replaced by each other option]. A model that
    reads the attribute ranks the first candidate highest."""
    probes = []
    for start in range(len(words)):
        for option in options:
            if words[start:start + len(option)] != option:
                continue
            head, tail = words[:start], words[start + len(option):]
            probes.append([words] + [head + other + tail for other in options if other != option])
            break
    return probes


def single_option(words: list[str], options: list[list[str]]) -> int:
    """The index of the option that occurs in the caption (words) when exactly one occurrence of any
    option does, else -1: "a big red circle" -> the index of "circle" among the shapes; a caption
    with two shapes, or none, gives no label."""
    found = [k for start in range(len(words)) for k, option in enumerate(options)
             if words[start:start + len(option)] == option]
    return found[0] if len(found) == 1 else -1


@torch.enable_grad()
def fit_linear_probe(features: torch.Tensor, labels: torch.Tensor, classes: int, steps: int = 300,
                     l2: float = 1e-3):
    """A softmax regression on standardised features [N, D] -> labels [N] in [0, classes), trained
    full-batch from zeros, so the same inputs always give the same probe. Returns predict(features)
    -> labels. Linear on purpose: it says what the features hold, not what a new network could learn."""
    x = features.detach().float()
    mean, std = x.mean(0), x.std(0) + 1e-5
    weight = torch.zeros(x.shape[1], classes, device=x.device, requires_grad=True)
    bias = torch.zeros(classes, device=x.device, requires_grad=True)
    opt = torch.optim.Adam([weight, bias], lr=0.01)
    for _ in range(steps):
        loss = F.cross_entropy(((x - mean) / std) @ weight + bias, labels) + l2 * weight.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    weight, bias = weight.detach(), bias.detach()
    return lambda f: (((f.float() - mean) / std) @ weight + bias).argmax(dim=1)

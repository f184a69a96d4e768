"""Off-palette recolouring of the demo world's flat-colour objects, for Stage C's and Stage E's
`recolour_share` (why: docs/stage_e_experiments.md, "What limits the test figures").

Each object of a training image (all pixels of one colour near a palette colour; the top-left pixel
is the background) is, with probability `share`, repainted in a random colour far from every
palette colour and from the background. Stage C drops the colour word from the caption; Stage E keeps
the turns still true (`drop_repainted`). The ViT and the Thinker then see every shape in colours they
have no name for, so what they learn of shape stops leaning on colour, and no colour-shape pair held
out from training is ever shown. Off by default: photographs have no flat colours.
"""
from __future__ import annotations

import torch

from omni.data.world import COLOURS

PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float)   # [6, 3] in 0..255
PALETTE_NAMES = list(COLOURS)
OBJECT_TOLERANCE = 40.0   # an object's colour lies within this RGB distance of its palette colour (jitter 15)
OFF_PALETTE = 80.0        # a repainted object lies at least this far from every palette and background colour


def _off_palette(generator: torch.Generator, background: torch.Tensor) -> torch.Tensor:
    while True:
        c = torch.randint(0, 256, (3,), generator=generator).float()
        if (PALETTE - c).norm(dim=1).min() >= OFF_PALETTE and (background - c).norm() >= OFF_PALETTE:
            return c


def recolour(img: torch.Tensor, generator: torch.Generator, share: float) -> tuple[torch.Tensor, list[str]]:
    """img [3,H,W] in [-1,1] with each object's colour (all pixels of one palette-near colour),
    with probability `share`, replaced by an off-palette one; returns (image, names of the palette
    colours replaced). The top-left pixel is the background."""
    rgb = ((img + 1) * 127.5).round()
    background = rgb[:, 0, 0]
    # One integer per pixel colour: unique over [H*W] integers is ~5x faster than unique rows of
    # [H*W, 3], and sorts the colours in the same (r, g, b) order, so the draws stay the same.
    code = (rgb[0] * 65536 + rgb[1] * 256 + rgb[2]).clamp(0, 256 ** 3 - 1).long()
    values = torch.unique(code)
    colours = torch.stack([values // 65536, values // 256 % 256, values % 256], 1).float()
    out, removed = rgb.clone(), []
    for value, colour in zip(values, colours):
        distance = (PALETTE - colour).norm(dim=1)
        if (colour - background).abs().max() < 1 or distance.min() > OBJECT_TOLERANCE:
            continue
        if float(torch.rand((), generator=generator)) >= share:
            continue
        out[:, code == value] = _off_palette(generator, background)[:, None]
        removed.append(PALETTE_NAMES[int(distance.argmin())])
    return out / 127.5 - 1.0, removed


def drop_words(text: str, words: list[str]) -> str:
    """The text without the given words (the colour names of repainted objects)."""
    return " ".join(w for w in text.split(" ") if w not in words)


def drop_repainted(conversation: list[dict], removed: list[str]) -> list[dict]:
    """The turns of a user/assistant conversation still true after the objects of the `removed`
    colours were repainted: a question that names one goes with its answer, an answer that names
    one loses the word ("a big red circle" -> "a big circle"), and goes if nothing is left of it
    ("red")."""
    kept = []
    for question, answer in zip(conversation[0::2], conversation[1::2]):
        names_one = any(w in removed for w in question["content"].rstrip("?").split())
        reply = drop_words(answer["content"], removed)
        if reply and not names_one:
            kept += [question, {**answer, "content": reply}]
    return kept

"""Shape and colour kept apart, for images of flat-coloured objects on a plain background (the
demo world). Off by default: real photographs have neither a plain background nor flat colours.

Why (docs/stage_e_sft.md, "What limits the test figures"): the demo world's test split asks about
colour-shape pairs that training never shows. A ViT whose patch tokens carry colour and shape fused
learns "a red circle" as one thing, and the Thinker learns that circles are never orange; held-out
pairs then get the colour of a familiar pair. Three measures, each a config option:

- Stage C, `recolour_share`: each object of a training image is, with this probability, repainted
  in a random colour far from every palette colour, and its colour word is dropped from the
  caption. The ViT then sees every shape in unnamed colours, so its shape features stop depending
  on the colour.
- Stage E, `recolour_share`: the same repainting of training images, with every question about
  a repainted colour dropped (`drop_repainted`): the Thinker sees every shape in unnamed colours
  too, so finding "the circle" cannot lean on the colours circles had in training.
- Stage E, `colour_apart`: the ViT sees the image with every object painted one grey (its
  *silhouette*: shape, size and place), and each patch's mean colour is added to that patch's token
  after the projector, through a small MLP of its own (`patch_colours`, OmniModel's proj_v.colour).
  Shape and colour meet only in the Thinker, as two terms of one token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from omni.data.world import COLOURS

PALETTE = torch.tensor(list(COLOURS.values()), dtype=torch.float)   # [6, 3] in 0..255
PALETTE_NAMES = list(COLOURS)
OBJECT_TOLERANCE = 40.0   # an object's colour lies within this RGB distance of its palette colour (jitter 15)
OFF_PALETTE = 80.0        # a repainted object lies at least this far from every palette and background colour
FOREGROUND = 10 / 127.5   # a pixel farther than this from the top-left pixel (in [-1,1] units) is an object
SILHOUETTE_GREY = 128 / 127.5 - 1
COLOUR_SCALE = 3.0        # patch colours in [-1,1] -> [-3,3]: on the scale of the projected ViT tokens


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
    out, removed = rgb.clone(), []
    for colour in torch.unique(rgb.reshape(3, -1).T, dim=0):
        distance = (PALETTE - colour).norm(dim=1)
        if (colour - background).abs().max() < 1 or distance.min() > OBJECT_TOLERANCE:
            continue
        if float(torch.rand((), generator=generator)) >= share:
            continue
        out[:, (rgb == colour[:, None, None]).all(0)] = _off_palette(generator, background)[:, None]
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


def silhouette(images: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in [-1,1]: every pixel that differs from the top-left (background) pixel painted one grey."""
    background = images[:, :, :1, :1]
    foreground = (images - background).abs().amax(1, keepdim=True) > FOREGROUND
    return torch.where(foreground, torch.full_like(images, SILHOUETTE_GREY), background.expand_as(images))


def patch_colours(images: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[B, num_tokens, 3]: a zero row for the CLS token, then each patch's mean colour (scaled by
    COLOUR_SCALE), in the ViT's patch order (row by row)."""
    grid = round((num_tokens - 1) ** 0.5)
    means = F.avg_pool2d(images, images.shape[-1] // grid).flatten(2).transpose(1, 2)
    return torch.cat([means.new_zeros(images.shape[0], 1, 3), means * COLOUR_SCALE], dim=1)

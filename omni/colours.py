"""Shape and colour kept apart on the way into the Thinker (Stage E's `colour_apart`), for images of
flat-coloured objects on a plain background (the demo world; off for photographs).

The ViT sees each image's *silhouette*, every object painted one grey (shape, size and place, no
colour), and each patch's mean colour is added to that patch's token after the projector, through a
small MLP of its own (`patch_colours`; OmniModel's `proj_v.colour`). Shape and colour meet only in
the Thinker, as two terms of one token, so a colour-shape pair never seen in training is read as
well as a familiar one (docs/stage_e_sft.md, "What limits the test figures"; the recolouring that
goes with it is omni/data/recolour.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FOREGROUND = 10 / 127.5   # a pixel farther than this from the top-left pixel (in [-1,1] units) is an object
SILHOUETTE_GREY = 128 / 127.5 - 1
COLOUR_SCALE = 3.0        # patch colours in [-1,1] -> [-3,3]: on the scale of the projected ViT tokens


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

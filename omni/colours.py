"""Shape and colour kept apart on the way into the Thinker (Stage E's `colour_apart`), for images of
flat-coloured objects on a plain background (the demo world; off for photographs).

The ViT sees each image's *silhouette*, every object painted one grey (shape, size and place, no
colour), and each patch's mean colour is added to that patch's token after the projector, through a
small MLP of its own (`patch_colours`; OmniModel's `proj_v.colour`). Shape and colour meet only in
the Thinker, as two terms of one token, so a colour-shape pair never seen in training is read as
well as a familiar one (docs/stage_e_experiments.md, "What limits the test figures"; the recolouring that
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


# ---------------------------------------------------------------- object tokens (Stage E's object_tokens)
# One token per object instead of one per patch: the ViT's patch tokens averaged over the patches
# the object covers (weighted by how much of each it covers), with the object's mean colour, centre
# and extent beside them, and its outline: its silhouette cropped to a square around it, which
# proj_v maps through an MLP of its own (apart from the colour's). Finding "the circle" among three
# objects is then a choice among three whole-shape codes rather than among 64 patches that each
# hold part of a shape; E learns faster and, with most training objects repainted
# (recolour_share), binds held-out colour-shape pairs. The outline makes the shape code E's own
# rather than only what Stage C's ViT gives, which differs from run to run (docs/stage_e_sft.md,
# "Object tokens" and "Outlines").
MAX_OBJECTS = 8     # the largest objects first; the demo world draws one to three
MIN_PIXELS = 4      # smaller foreground regions are noise, not objects
CROP = 8            # an object's silhouette, cropped to a square around it, at CROP x CROP
DESCRIPTOR = 6 + CROP * CROP   # colour (3), centre (2), extent (1), silhouette crop


def object_masks(images: torch.Tensor) -> list[torch.Tensor]:
    """Per image, [K, H, W] bool: its objects, the 8-connected regions of foreground (pixels unlike
    the top-left one), largest first, at most MAX_OBJECTS of at least MIN_PIXELS."""
    background = images[:, :, :1, :1]
    foreground = ((images - background).abs().amax(1, keepdim=True) > FOREGROUND).float()   # float32: exact labels
    b, _, h, w = foreground.shape
    index = torch.arange(1, h * w + 1, dtype=torch.float32, device=images.device).reshape(1, 1, h, w)
    labels = foreground * index
    while True:   # every pixel takes the largest label among its neighbours until the regions agree
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * foreground
        if torch.equal(grown, labels):
            break
        labels = grown
    masks = []
    for image_labels in labels[:, 0]:
        regions = [image_labels == v for v in image_labels.unique() if v > 0]
        regions = sorted((m for m in regions if m.sum() >= MIN_PIXELS), key=lambda m: -int(m.sum()))
        masks.append(torch.stack(regions[:MAX_OBJECTS]) if regions else images.new_zeros(0, h, w, dtype=torch.bool))
    return masks


def silhouette_crops(masks: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """[K, CROP*CROP] in [-1, 1]: each mask [K, H, W] cropped to the square around its bounding box
    and resized, so its outline reads the same at any size and place."""
    if not len(masks):
        return masks.new_zeros(0, CROP * CROP)
    h, w = masks.shape[-2:]
    inside = masks > 0
    big = torch.tensor(float("inf"), device=masks.device)
    x0, x1 = torch.where(inside, xs, big).flatten(1).amin(1), torch.where(inside, xs, -big).flatten(1).amax(1)
    y0, y1 = torch.where(inside, ys, big).flatten(1).amin(1), torch.where(inside, ys, -big).flatten(1).amax(1)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    half = torch.maximum(x1 - x0, y1 - y0) / 2 + 1 / min(h, w)      # + half a pixel on each side
    # affine_grid maps the output square onto [cx - half, cx + half] x [cy - half, cy + half]
    theta = torch.zeros(len(masks), 2, 3, device=masks.device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = half, cx, half, cy
    # sampled 4 x 4 per cell and averaged: each cell holds the share of it the object covers, so
    # a thin part between two sample points is not lost
    grid = F.affine_grid(theta, (len(masks), 1, 4 * CROP, 4 * CROP), align_corners=True)
    crops = F.avg_pool2d(F.grid_sample(masks[:, None], grid, mode="bilinear", align_corners=True), 4)
    return crops.flatten(1) * 2 - 1


def object_tokens(images: torch.Tensor, feats: torch.Tensor,
                  masks: list[torch.Tensor] | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, (tokens [1+K, D], descriptors [1+K, DESCRIPTOR]) from ViT features [B, 1+P, D]
    (CLS, then the patches row by row): the CLS token with a zero descriptor, then each object's
    coverage-weighted mean of patch tokens with its mean colour (x COLOUR_SCALE), centre (x, y in
    [-1, 1]), extent (sqrt of its share of the image, x 2) and silhouette crop (silhouette_crops).
    `masks`: the images' object_masks, where already known."""
    grid = round((feats.shape[1] - 1) ** 0.5)
    h, w = images.shape[-2:]
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=images.device),
                            torch.linspace(-1, 1, w, device=images.device), indexing="ij")
    out = []
    for image, patches, cls, regions in zip(images, feats[:, 1:], feats[:, :1], masks or object_masks(images)):
        m = regions.float()                                             # [K, H, W]
        cover = F.adaptive_avg_pool2d(m[:, None], grid).flatten(1)      # [K, P]: share of each patch
        pooled = (cover.to(patches.dtype) @ patches) / cover.sum(1, keepdim=True).clamp_min(1e-6).to(patches.dtype)
        area = m.flatten(1).sum(1).clamp_min(1)
        colour = (m.flatten(1) @ image.float().flatten(1).T) / area[:, None]
        centre = torch.stack([(m * xs).flatten(1).sum(1), (m * ys).flatten(1).sum(1)], 1) / area[:, None]
        extent = 2 * (area / (h * w)).sqrt()[:, None]
        descriptors = torch.cat([colour * COLOUR_SCALE, centre, extent, silhouette_crops(m, xs, ys)], 1)
        descriptors = torch.cat([descriptors.new_zeros(1, DESCRIPTOR), descriptors]).to(feats.dtype)
        out.append((torch.cat([cls, pooled]), descriptors))
    return out

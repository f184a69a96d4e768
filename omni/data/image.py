"""Images: decoded with PIL, brought to a square of the model's size, normalised, lightly
augmented; the image-caption dataset.

Any size and aspect ratio is accepted; `resize` (config key `image_resize`) says how it becomes
size x size: "squash" scales each side on its own (the aspect ratio is lost; the demo world's
images are square already), "center_crop" scales the short side to size and cuts the middle of
the long one (nothing distorted, the borders lost), "pad" scales the long side to size and pads
the short one equally on both sides with 0 (mid grey; nothing lost, fewer useful pixels)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from omni.data.manifest import ManifestDataset, SampleError, media_file
from omni.data.recolour import drop_words, recolour


RESIZE_MODES = ("squash", "center_crop", "pad")


def fit_square(img: torch.Tensor, size: int, mode: str = "squash") -> torch.Tensor:
    """img [C, H, W] -> [C, size, size] by one of RESIZE_MODES (see the module docstring)."""
    h, w = img.shape[-2:]
    if mode not in RESIZE_MODES:
        raise ValueError(f"image resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    if mode == "squash":
        target = (size, size)
    else:
        scale = size / (min(h, w) if mode == "center_crop" else max(h, w))
        target = (max(1, round(h * scale)), max(1, round(w * scale)))
    if (h, w) != target:
        img = F.interpolate(img[None], size=target, mode="bilinear", align_corners=False, antialias=True)[0]
    h, w = target
    if mode == "center_crop":
        top, left = (h - size) // 2, (w - size) // 2
        img = img[:, top:top + size, left:left + size]
    elif mode == "pad":
        top, left = (size - h) // 2, (size - w) // 2
        img = F.pad(img, (left, size - w - left, top, size - h - top), value=0.0)
    return img


def read_image(path: str, size: int, resize: str = "squash") -> torch.Tensor:
    """RGB float image [3, size, size] in [-1, 1] from an image of any size (`resize`: one of
    RESIZE_MODES); SampleError saying why if it cannot be used (missing, empty, not an image, damaged)."""
    # PIL decodes (torchvision's own decoders are deprecated in favour of torchcodec).
    try:
        with Image.open(media_file(path)) as im:
            img = pil_to_tensor(im.convert("RGB"))
    except UnidentifiedImageError:
        raise SampleError(f"{path}: not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError(f"{path}: damaged image ({e})") from None
    return fit_square(img.float() / 127.5 - 1.0, size, resize)


def shift_image(img: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Translate by up to max_shift pixels, filling with the border colour. No flips or colour
    changes: captions speak of left/right and of colours, which those would falsify."""
    if max_shift <= 0:
        return img
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    padded = F.pad(img[None], (max_shift,) * 4, mode="replicate")[0]
    h, w = img.shape[-2:]
    return padded[:, max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


class ImageCaptionDataset(ManifestDataset):
    """{"image": [3, S, S], "caption": str} per record of an image-caption manifest."""

    def __init__(self, records, image_size: int = 64, max_shift: int = 0, resize: str = "squash",
                 recolour_share: float = 0.0, **kw):
        super().__init__(records, **kw)
        self.image_size, self.max_shift, self.resize = image_size, max_shift, resize
        self.recolour_share = recolour_share    # demo world only (omni/data/recolour.py)

    def load(self, record, generator):
        caption = str(record["caption"]).strip()
        if not caption:
            raise SampleError("empty caption")
        img = read_image(record["image"], self.image_size, self.resize)
        if generator is not None:
            if self.recolour_share:
                img, repainted = recolour(img, generator, self.recolour_share)
                caption = drop_words(caption, repainted)
            img = shift_image(img, generator, self.max_shift)
        return {"image": img, "caption": caption}

"""Images: decoded with torchvision, resized, normalised, lightly augmented; the image-caption
dataset."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor

from omni.data.manifest import ManifestDataset, SampleError, media_file


def read_image(path: str, size: int) -> torch.Tensor:
    """RGB float image [3, size, size] in [-1, 1]; SampleError saying why if it cannot be used
    (missing, empty, not an image, damaged)."""
    # PIL decodes (torchvision's own decoders are deprecated in favour of torchcodec).
    try:
        with Image.open(media_file(path)) as im:
            img = pil_to_tensor(im.convert("RGB"))
    except UnidentifiedImageError:
        raise SampleError(f"{path}: not an image (PIL cannot identify it)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SampleError(f"{path}: damaged image ({e})") from None
    img = img.float() / 127.5 - 1.0
    if img.shape[-2:] != (size, size):
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    return img


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

    def __init__(self, records, image_size: int = 64, max_shift: int = 0, **kw):
        super().__init__(records, **kw)
        self.image_size, self.max_shift = image_size, max_shift

    def load(self, record, generator):
        caption = str(record["caption"]).strip()
        if not caption:
            raise SampleError("empty caption")
        img = read_image(record["image"], self.image_size)
        if generator is not None:
            img = shift_image(img, generator, self.max_shift)
        return {"image": img, "caption": caption}

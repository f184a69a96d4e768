"""Images: decoded with PIL, brought to a square of the model's size, normalised, lightly
augmented; the image-caption dataset.

Any size and aspect ratio is accepted; `resize` (config key `image_resize`) says how it becomes
size x size: "squash" scales each side on its own (the aspect ratio is lost; the demo world's
images are square already), "center_crop" scales the short side to size and cuts the middle of
the long one (nothing distorted, the borders lost), "pad" scales the long side to size and pads
the short one equally on both sides with 0 (mid grey; nothing lost, fewer useful pixels)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.functional import adjust_hue, pil_to_tensor

from omni.data.manifest import ManifestDataset, SampleError, media_file


RESIZE_MODES = ("squash", "center_crop", "pad")
# The largest image decoded (width x height, read from the file's header first): decoding and the float
# tensor cost about 30 bytes a pixel, so a 12000 x 12000 PNG of 420 KB took 13.7 s and 4.4 GB at every
# load (issue 38), for a model that sees it at image_size. 50 megapixels still takes
# the photos of 48 MP phone cameras (8064 x 6048) and 45 MP full-frame cameras; PIL itself only
# warns from 89 MP on and refuses from 179 MP. Config key `max_image_pixels` of stages C and E.
MAX_IMAGE_PIXELS = 50_000_000


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


def read_image(path: str, size: int, resize: str = "squash", max_pixels: int = MAX_IMAGE_PIXELS) -> torch.Tensor:
    """RGB float image [3, size, size] in [-1, 1] from an image of any size up to max_pixels (width x
    height; `resize`: one of RESIZE_MODES); SampleError saying why if it cannot be used (missing, empty,
    not an image, damaged, larger than max_pixels: known from the header, never decoded)."""
    # PIL decodes (torchvision's own decoders are deprecated in favour of torchcodec).
    try:
        with warnings.catch_warnings():     # PIL's warning of a large image: max_pixels, below it, decides
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(media_file(path))   # lazy: reads the header; convert() decodes
        with im:
            width, height = im.size
            if width * height > max_pixels:
                raise SampleError(f"{path}: {width}x{height} image ({width * height / 1e6:.1f} megapixels) is "
                                  f"larger than max_image_pixels {max_pixels:_}")
            img = pil_to_tensor(im.convert("RGB"))
    except UnidentifiedImageError:
        raise SampleError(f"{path}: not an image (PIL cannot identify it)") from None
    except Image.DecompressionBombError as e:    # past PIL's own limit, refused at open
        raise SampleError(f"{path}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise SampleError(f"{path}: damaged image ({e})") from None
    return fit_square(img.float() / 127.5 - 1.0, size, resize)


def shift_image(img: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Translate by up to max_shift pixels, filling with the border colour. No flips: captions
    speak of left and right, which a flip would falsify."""
    if max_shift <= 0:
        return img
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,), generator=generator))
    padded = F.pad(img[None], (max_shift,) * 4, mode="replicate")[0]
    h, w = img.shape[-2:]
    return padded[:, max_shift + dy:max_shift + dy + h, max_shift + dx:max_shift + dx + w]


def rotate_hue(img: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The whole image's hues turned by a uniformly drawn angle (greys stay grey, shapes and
    brightness stay): a model that must name shapes in any colour cannot tie a shape to its colour."""
    turn = float(torch.rand((), generator=generator)) - 0.5      # adjust_hue's range: [-0.5, 0.5] of a turn
    return adjust_hue((img + 1) / 2, turn) * 2 - 1


def without_words(caption: str, words: frozenset[str]) -> str:
    """The caption with the given words (lower case, whole words) left out."""
    return " ".join(w for w in caption.split() if w.lower().strip(".,;:!?") not in words)


class ImageCaptionDataset(ManifestDataset):
    """{"image": [3, S, S], "caption": str} per record of an image-caption manifest. Training
    samples (a generator given) are shifted by up to max_shift pixels, and a share hue_share of them
    have their hues turned, with the caption's colour_words, which the turn falsifies, left out."""

    def __init__(self, records, image_size: int = 64, max_shift: int = 0, resize: str = "squash",
                 max_pixels: int = MAX_IMAGE_PIXELS, hue_share: float = 0.0, colour_words=(), **kw):
        super().__init__(records, **kw)
        self.image_size, self.max_shift, self.resize, self.max_pixels = image_size, max_shift, resize, max_pixels
        self.hue_share, self.colour_words = hue_share, frozenset(w.lower() for w in colour_words)

    def load(self, record, generator):
        caption = str(record["caption"]).strip()
        if not caption:
            raise SampleError("empty caption")
        img = read_image(record["image"], self.image_size, self.resize, self.max_pixels)
        if generator is not None:
            img = shift_image(img, generator, self.max_shift)
            if self.hue_share and float(torch.rand((), generator=generator)) < self.hue_share:
                img, caption = rotate_hue(img, generator), without_words(caption, self.colour_words)
        return {"image": img, "caption": caption}

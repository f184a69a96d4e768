"""Stage C: the ViT vision encoder, trained contrastively against captions (docs/stage_c_vision.md)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from omni.config import TrainConfig, UserError, choice, fraction, positive
from omni.data.common import require_files
from omni.data.image import MAX_IMAGE_PIXELS, RESIZE_MODES, ImageCaptionDataset
from omni.data.manifest import read_manifest
from omni.logs import log
from omni.metrics import fit_linear_probe, parse_probe_groups, retrieval_hits, single_option, swap_probes
from omni.registry import STAGES
from omni.train.stage import Stage, make_loader, to_device
from omni.vision import CLIP, VisionArch, build_vocab, caption_words, info_nce


@dataclass
class VisionConfig(TrainConfig, VisionArch):
    train_manifest: str = "data/demo/image_caption_train.jsonl"
    val_manifest: str = "data/demo/image_caption_val.jsonl"
    test_manifest: str = ""            # also scored at every validation when set
    image_column: str = "image"        # manifest column names
    caption_column: str = "caption"
    max_shift: int = 4                 # training shift augmentation in pixels (no flips)
    # A share of the training images has its hues turned by a random angle, and their captions lose
    # colour_words, which the turn falsifies: shapes must then be named in colours they never had.
    hue_share: float = fraction(0.0)
    colour_words: list[str] = field(default_factory=list)
    image_resize: str = choice(*RESIZE_MODES)   # how any image becomes image_size square (omni/data/image.py)
    # larger images (width x height, from the header) are bad samples, never decoded (omni/data/image.py)
    max_image_pixels: int = positive(MAX_IMAGE_PIXELS)
    gallery_size: int = 100            # retrieval among consecutive chunks of this many pairs; 0 = whole split
    caption_weight: float = 1.0        # weight of the caption decoder's loss (when decoder_layers > 0)
    # Attribute probes at each validation: "name=word|word|..." groups of interchangeable words; for
    # each occurrence in a caption, is the true caption scored above its swaps? Linear probes of the CLS
    # token too, fitted on familiar pairs and read on held-out ones (linear_probes). [] = no probes.
    probe_groups: list[str] = field(default_factory=list)
    probe_images: int = 200            # images of each split probed (the first ones; 0 = all)
    save_dir: str = "checkpoints/vision_tiny"

    def __post_init__(self):
        super().__post_init__()
        if self.hue_share > 0 and not self.colour_words:
            raise UserError("config key 'colour_words': empty while hue_share > 0; the turned images' "
                            "captions would keep colour words that are no longer true")


class VisionStage(Stage):
    spec = STAGES["C"]
    config_class = VisionConfig

    def setup(self):
        cfg = self.cfg
        manifests = {"train_manifest": "" if self.evaluation_only else cfg.train_manifest,
                     "val_manifest": cfg.val_manifest, "test_manifest": cfg.test_manifest}
        require_files(cfg, {k: [v] for k, v in manifests.items() if v}, self.rt)
        if not self.evaluation_only:    # an evaluated checkpoint's config brings its vocab
            train = self.records(cfg.train_manifest)
            if not cfg.vocab:   # stored in config.json and every checkpoint, so inference rebuilds the same ids
                cfg.vocab = build_vocab(r["caption"] for r in train)
            self.train_data = self.dataset(train, train=True)
        self.val_data = self.dataset(self.records(cfg.val_manifest))
        self.test_data = self.dataset(self.records(cfg.test_manifest)) if cfg.test_manifest else None
        self.probe_groups = parse_probe_groups(cfg.probe_groups)
        self.model = CLIP(VisionArch.from_config(cfg))
        self.modules = self.model.parts()
        log(self.rt, f"vision: {len(self.train_data or [])} training pairs, {len(self.val_data)} validation pairs, "
                     f"{len(cfg.vocab)} caption words; {sum(p.numel() for p in self.model.parameters()):,} parameters")

    def records(self, path: str) -> list[dict]:
        columns = {"image": self.cfg.image_column, "caption": self.cfg.caption_column}
        return read_manifest(path, ["image", "caption"], columns)

    def dataset(self, records, train: bool = False) -> ImageCaptionDataset:
        """Training data is augmented (shifted, hues turned), evaluation data never."""
        cfg = self.cfg
        shift = cfg.max_shift if train else 0
        return ImageCaptionDataset(records, image_size=cfg.image_size, max_shift=shift, resize=cfg.image_resize,
                                   max_pixels=cfg.max_image_pixels, hue_share=cfg.hue_share if train else 0.0,
                                   colour_words=cfg.colour_words, seed=cfg.seed, strict=cfg.strict_data,
                                   augment=train and (shift > 0 or cfg.hue_share > 0))

    def collate(self, samples):
        captions = [s["caption"] for s in samples]
        ids, mask = self.model.tokenizer.batch(captions)
        same = torch.tensor([[a == b for b in captions] for a in captions])
        return {"images": torch.stack([s["image"] for s in samples]), "ids": ids, "mask": mask, "same": same}

    def loss(self, batch):
        contrastive, captioning = self.model.losses(batch["images"], batch["ids"], batch["mask"], batch["same"])
        extra = {"n_images": batch["images"].shape[0], "logit_scale": self.model.logit_scale().item()}
        if captioning is None:
            return contrastive, extra
        extra.update(contrastive=contrastive.item(), captioning=captioning.item())
        return contrastive + self.cfg.caption_weight * captioning, extra

    def galleries(self, dataset):
        """This rank's galleries (gallery_size consecutive pairs each; the last may be smaller)."""
        n = len(dataset)
        size = self.cfg.gallery_size or n
        batches = [[(i, 0) for i in range(s, min(s + size, n))] for s in range(0, n, size)]
        if self.cfg.eval_batches:
            batches = batches[:self.cfg.eval_batches]
        for batch, _ in make_loader(dataset, batches[self.rt.rank::self.rt.world_size], self, workers=0):
            if batch is not None:
                yield to_device(batch, self.rt.device)

    def score(self, dataset) -> list[float]:
        """[loss sum, pairs, image->caption hits, caption->image hits] over this rank's galleries."""
        totals = [0.0] * 4
        for batch in self.galleries(dataset):
            with self.rt.autocast():
                logits = self.model.logits(batch["images"], batch["ids"], batch["mask"])
            n = logits.shape[0]
            counts = (info_nce(logits, batch["same"]).item() * n, n, *retrieval_hits(logits, batch["same"]))
            totals = [t + c for t, c in zip(totals, counts)]
        return totals

    def probe(self, dataset) -> list[float]:
        """[right, asked] per probe group over this rank's share of the first probe_images images."""
        counts = [0.0] * (2 * len(self.probe_groups))
        n = min(len(dataset), self.cfg.probe_images or len(dataset))
        for i in range(self.rt.rank, n, self.rt.world_size):
            sample = dataset[(i, 0)]
            if sample is None:
                continue
            words = caption_words(sample["caption"])
            probes = [(g, candidates) for g, options in enumerate(self.probe_groups.values())
                      for candidates in swap_probes(words, options)]
            if not probes:
                continue
            captions = [" ".join(c) for _, candidates in probes for c in candidates]
            with self.rt.autocast():
                scores = self.model.caption_scores(sample["image"].to(self.rt.device), captions).tolist()
            for g, candidates in probes:    # the true caption must beat every swap of its group
                mine, scores = scores[:len(candidates)], scores[len(candidates):]
                counts[2 * g] += float(mine[0] > max(mine[1:]))
                counts[2 * g + 1] += 1
        return counts

    @torch.no_grad()
    def cls_features(self, dataset) -> tuple[torch.Tensor, list[list[str]]]:
        """The ViT's CLS token [N, vit_dim] and the caption words of every usable image of a split."""
        feats, words = [], []
        for start in range(0, len(dataset), 256):
            samples = [dataset[(i, 0)] for i in range(start, min(start + 256, len(dataset)))]
            samples = [s for s in samples if s is not None]     # unreadable images are skipped and counted
            if samples:
                images = torch.stack([s["image"] for s in samples]).to(self.rt.device)
                with self.rt.autocast():
                    feats.append(self.model.vit(images)[:, 0].float())
                words += [caption_words(s["caption"]) for s in samples]
        return (torch.cat(feats) if feats else torch.zeros(0, self.cfg.vit_dim, device=self.rt.device)), words

    def linear_probes(self) -> dict[str, float]:
        """linear_<group>: a linear probe of the CLS token, fitted on the first half of the val images
        whose caption names exactly one member of the group, scored on the second half;
        test_linear_<group>: fitted on all of them, scored on such test images, whose colour-shape
        pairs training never showed. Read beside each other they say whether the ViT's features for
        one attribute hold when the other changes. Every rank computes them on whole splits."""
        def labelled(split, options):
            feats, words = split
            labels = torch.tensor([single_option(w, options) for w in words], dtype=torch.long, device=feats.device)
            return feats[labels >= 0], labels[labels >= 0]

        def accuracy(fit_x, fit_y, x, y, classes):
            return (fit_linear_probe(fit_x, fit_y, classes)(x) == y).float().mean().item()

        val = self.cls_features(self.val_data)
        test = self.cls_features(self.test_data) if self.test_data is not None else None
        out = {}
        for name, options in self.probe_groups.items():
            x, y = labelled(val, options)
            half = len(y) // 2
            if half < 2:
                continue
            out[f"linear_{name}"] = accuracy(x[:half], y[:half], x[half:], y[half:], len(options))
            if test is not None:
                tx, ty = labelled(test, options)
                if len(ty):
                    out[f"test_linear_{name}"] = accuracy(x, y, tx, ty, len(options))
        return out

    def evaluate(self):
        out = {}
        for split, data in (("val", self.val_data), ("test", self.test_data)):
            if data is None:
                continue
            loss, n, i2t, t2i = self.rt.sum(self.score(data))
            name = "" if split == "val" else "test_"   # the val names predate the test split
            out.update({f"{split}_loss": loss / max(n, 1), f"{name}i2t_top1": i2t / max(n, 1),
                        f"{name}t2i_top1": t2i / max(n, 1)})
            if self.probe_groups:
                counts = self.rt.sum(self.probe(data))
                out.update({f"{name}probe_{g}": counts[2 * k] / max(counts[2 * k + 1], 1)
                            for k, g in enumerate(self.probe_groups)})
        if self.probe_groups:
            out.update(self.linear_probes())
        return out

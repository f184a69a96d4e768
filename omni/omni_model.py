"""The omni model: the Thinker reading text, image and audio through projectors.

A conversation becomes one embedding sequence:

    <s> <user> [<img> v_1 .. v_N </img>] [<audio> a_1 .. a_M </audio> heard] question <assistant> answer </s>

where v_i are the vision encoder's tokens and a_j the audio encoder's frames, each mapped to the
Thinker's width by a small MLP (proj_v, proj_a); `heard` (Stage B's greedy CTC transcript of the
same frames) is there when the model has a transcriber; without `audio_frames` the a_j are left
out and `heard` alone carries the question. Media attach to the first user turn;
later turns repeat `<user> question <assistant> answer </s>`. Training predicts only the answer tokens and
their closing </s>; generation stops at </s>. The same code builds sequences for SFT and for
inference, so the two cannot drift apart.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from omni.colours import CROP, DESCRIPTOR, object_masks, object_tokens, patch_colours, silhouette
from omni.layers import pad_stack
from omni.thinker import Thinker
from omni.tokenizer import Tokenizer

IGNORE = -100
VISION_CACHE_BYTES = 512 * 2**20    # OmniModel.vision_cache stops growing here


def mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    """Linear, GELU, Linear: the projectors' one building block."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class Projector(nn.Module):
    """Encoder features -> Thinker embeddings: Linear, GELU, Linear. With `colour` (the vision
    projector under Stage E's colour_apart, omni/colours.py: the width of each token's colour
    descriptor, 3 for a patch's mean colour, colours.DESCRIPTOR for an object's) each token
    also gets its descriptor added through an MLP of its own: colour beside shape, never fused with it. (An MLP, not
    a linear map: attention scores are linear in what they read, and a linear colour embedding
    cannot make "red" score above every other colour the training images hold, so "the red one"
    could not be found; measured in docs/stage_e_experiments.md.)"""

    def __init__(self, in_dim: int, out_dim: int, colour: int = 0, outline: int = 0):
        super().__init__()
        self.net = mlp(in_dim, out_dim)
        self.colour = mlp(colour - outline, out_dim) if colour else None
        # the descriptor's last `outline` numbers (an object's silhouette crop) get an MLP of their own:
        # through the colour's MLP, shape and colour would fuse and held-out pairs be lost
        self.outline = mlp(outline, out_dim) if outline else None

    def forward(self, x, colours: torch.Tensor | None = None):
        """x [..., in_dim]; colours [..., colour] (the descriptors) when the projector has a colour map."""
        if (colours is None) != (self.colour is None):
            raise ValueError("patch colours go with a colour projector (colour_apart), and only with one")
        if colours is None:
            return self.net(x)
        if self.outline is None:
            return self.net(x) + self.colour(colours)
        split = colours.shape[-1] - self.outline[0].in_features
        return self.net(x) + self.colour(colours[..., :split]) + self.outline(colours[..., split:])


def vision_projector(in_dim: int, out_dim: int, colour_apart: bool, objects: bool) -> Projector:
    """proj_v as Stage E's options shape it: a colour map of patch colours (colour_apart) or of
    object descriptors (object_tokens), or none."""
    return Projector(in_dim, out_dim, colour=(DESCRIPTOR if objects else 3) if colour_apart else 0,
                     outline=CROP * CROP if objects and colour_apart else 0)


def question_answer_pairs(conversation: list[dict]) -> list[tuple[str | None, str]]:
    """(question, answer) per assistant turn: the user turn just before it, None if there is none."""
    return [(prev["content"] if prev is not None and prev["role"] == "user" else None, turn["content"])
            for prev, turn in zip([None] + conversation[:-1], conversation) if turn["role"] == "assistant"]


class AnswerSmoothing:
    """Label smoothing within the answer type, for the first answer token of the `kinds` of
    conversation (Stage E's answer_smoothing; docs/stage_e_sft.md).

    The type of a question is its first two words ("what colour", "what shape", "how many"); its
    answer set is every first answer token seen in training after questions of that type. The target
    becomes (1 - eps) on the answer plus eps spread evenly over the set. Plain cross-entropy may push
    an answer never seen in a context (yellow, after "the triangle" when no triangle was ever yellow)
    down without bound; smoothing keeps every answer of the type in play, so what the image shows
    can still win on a pair held out from training."""

    def __init__(self, records: list[dict], tokenizer: Tokenizer, eps: float, kinds=("image_qa",)):
        self.eps, self.kinds = eps, set(kinds)
        answers: dict[str, set[int]] = {}
        for record in records:
            conversation = record.get("conversation")
            if record.get("kind") not in self.kinds or not isinstance(conversation, list):
                continue
            for question, answer in question_answer_pairs([t for t in conversation if isinstance(t, dict)]):
                ids = tokenizer.encode(answer) if isinstance(answer, str) else []
                if isinstance(question, str) and ids:
                    answers.setdefault(self.question_type(question), set()).add(ids[0])
        self.answers = {t: sorted(ids) for t, ids in answers.items() if len(ids) > 1}

    @staticmethod
    def question_type(question: str) -> str:
        return " ".join(question.split()[:2])

    def __call__(self, per_token, logits, labels, samples, eos_id: int) -> torch.Tensor:
        """per_token [B, L] cross-entropies with each smoothed first answer token's replaced."""
        log_probs = logits.log_softmax(-1)
        answering = labels != IGNORE        # an answer starts where its label follows a non-answer or </s>
        before = torch.cat([labels.new_full((labels.shape[0], 1), IGNORE), labels[:, :-1]], dim=1)
        starts = answering & ((before == IGNORE) | (before == eos_id))
        out = per_token.clone()
        for i, sample in enumerate(samples):
            if sample["kind"] not in self.kinds:
                continue
            positions = starts[i].nonzero().flatten().tolist()
            for p, (question, _) in zip(positions, question_answer_pairs(sample["conversation"])):
                same_type = self.answers.get(self.question_type(question or ""))
                if same_type:
                    spread = -log_probs[i, p, same_type].mean()
                    out[i, p] = (1 - self.eps) * per_token[i, p] + self.eps * spread
        return out


@dataclass
class Media:
    """Projected features of one sample's image and audio (either may be None)."""
    image: torch.Tensor | None = None      # [N, d_model]
    audio: torch.Tensor | None = None      # [M, d_model]
    transcript: str = ""                   # what the CTC reader heard, when the model has one


class OmniModel(nn.Module):
    def __init__(self, thinker: Thinker, tokenizer: Tokenizer, proj_a: Projector, proj_v: Projector,
                 audio_encoder: nn.Module | None = None, vision_encoder: nn.Module | None = None,
                 transcriber: nn.Module | None = None, audio_frames: bool = True, objects: bool = False):
        super().__init__()
        self.thinker, self.proj_a, self.proj_v = thinker, proj_a, proj_v
        self.audio_encoder, self.vision_encoder = audio_encoder, vision_encoder
        self.transcriber = transcriber   # (hidden, mask) -> texts; never trained
        # False: the frames are left out and the transcript alone carries a spoken question
        # (<audio></audio> then stays in the prompt as the sign that the question was spoken).
        self.audio_frames = audio_frames
        # True (Stage E's object_tokens; needs a colour projector): one image token per object
        # (omni/colours.py) after the CLS token, instead of one per patch.
        self.objects = objects
        self.tok = tokenizer
        # Stage E's vision_cache sets it to {} (the vision encoder frozen): the ViT's features of each
        # image (and its object masks) are then computed once and reused, a step about a third faster
        # on the demo world. An entry is computed for its image alone, never inside a batch, so its
        # numbers do not depend on which batch the image first came in (exact resume holds); that is
        # slower than a batch for images seen once, so it is for small image sets seen every epoch.
        self.vision_cache: dict | None = None
        self.vision_cache_bytes = 0

    @property
    def device(self):
        return self.thinker.embed.weight.device

    def parts(self) -> dict[str, nn.Module]:
        """The modules by their Stage E weight key (the encoders only where present)."""
        parts = {"thinker": self.thinker, "proj_a": self.proj_a, "proj_v": self.proj_v,
                 "audio_enc": self.audio_encoder, "vision": self.vision_encoder}
        return {key: module for key, module in parts.items() if module is not None}

    # ------------------------------------------------------------------ media
    def encode_media(self, images: list, mels: list, trained: tuple = ()) -> list[Media]:
        """Project each sample's image [3,H,W] and log-mel [T, n_mels] (None where absent); the
        encoders named in `trained` ("vision", "audio_enc") keep their gradients."""
        media = [Media() for _ in images]
        grad = torch.is_grad_enabled()
        has_img = [i for i, x in enumerate(images) if x is not None]
        if has_img:
            stacked = torch.stack([images[i] for i in has_img]).to(self.device)
            apart = self.proj_v.colour is not None      # colour_apart: the ViT sees silhouettes only
            seen = silhouette(stacked) if apart else stacked
            masks = None
            if self.vision_cache is not None and "vision" not in trained:
                feats, masks = self._cached_vision(stacked, seen)
            else:
                with torch.set_grad_enabled(grad and "vision" in trained):
                    feats = self._need(self.vision_encoder, "vision")(seen)
        has_aud = [i for i, x in enumerate(mels) if x is not None]
        if has_aud:
            with torch.set_grad_enabled(grad and "audio_enc" in trained):
                mel, mask = pad_stack([mels[i] for i in has_aud])
                hidden, hmask = self._need(self.audio_encoder, "audio")(mel.to(self.device), mask.to(self.device))
        if has_img:
            if self.objects:     # variable length: project all images' object tokens at once, then split
                tokens, descriptors = zip(*object_tokens(stacked, feats, masks))
                projected = self.proj_v(torch.cat(tokens), torch.cat(descriptors)).split([len(t) for t in tokens])
            else:
                projected = self.proj_v(feats, patch_colours(stacked, feats.shape[1]) if apart else None)
            for row, i in enumerate(has_img):
                media[i].image = projected[row]
        if has_aud:
            projected = self.proj_a(hidden) if self.audio_frames else None
            heard = self.transcriber(hidden, hmask) if self.transcriber is not None else [""] * len(has_aud)
            for row, i in enumerate(has_aud):
                media[i].audio = projected[row][hmask[row]] if projected is not None else self._ids([])
                media[i].transcript = heard[row]
        return media

    @torch.no_grad()
    def _cached_vision(self, images: torch.Tensor, seen: torch.Tensor) -> tuple[torch.Tensor, list | None]:
        """The frozen ViT's features [B, 1+P, D] of `seen` (what it is shown of `images`) and, with
        object tokens, each image's object masks: from vision_cache where the ViT saw the same pixels
        before, else computed for the image alone and kept while the cache is under VISION_CACHE_BYTES."""
        vision = self._need(self.vision_encoder, "vision")
        entries = []
        for image, shown in zip(images, seen):
            key = hashlib.blake2b(shown.cpu().numpy().tobytes(), digest_size=16).digest()
            entry = self.vision_cache.get(key)
            if entry is None:
                entry = (vision(shown[None])[0], object_masks(image[None])[0] if self.objects else None)
                size = entry[0].nbytes + (entry[1].nbytes if self.objects else 0)
                if self.vision_cache_bytes + size <= VISION_CACHE_BYTES:
                    self.vision_cache[key] = entry
                    self.vision_cache_bytes += size
            entries.append(entry)
        feats, masks = zip(*entries)
        return torch.stack(feats), list(masks) if self.objects else None

    @staticmethod
    def _need(encoder, name):
        if encoder is None:
            raise ValueError(f"this model has no {name} encoder")
        return encoder

    # ------------------------------------------------------------------ sequences
    def _ids(self, ids: list[int]) -> torch.Tensor:
        return self.thinker.embed(torch.tensor(ids, dtype=torch.long, device=self.device))

    def _user_turn(self, text: str, media: Media | None) -> list[torch.Tensor]:
        sp = self.tok.special
        parts = [self._ids([sp["<user>"]])]
        if media is not None and media.image is not None:
            parts += [self._ids([sp["<img>"]]), media.image, self._ids([sp["</img>"]])]
        if media is not None and media.audio is not None:
            parts += [self._ids([sp["<audio>"]]), media.audio, self._ids([sp["</audio>"]])]
            text = " ".join(t for t in (media.transcript, text) if t)   # the words heard, then any typed
        return parts + [self._ids(self.tok.encode(text) + [sp["<assistant>"]])]

    def training_sequence(self, conversation: list[dict], media: Media) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [L, D], labels [L]): labels[i] is the token at i+1 where it is part of an
        answer (answer tokens and their </s>), else IGNORE."""
        parts, labels = [self._ids([self.tok.bos_id])], [IGNORE]
        first = True
        for turn in conversation:
            if turn["role"] == "user":
                pieces = self._user_turn(turn["content"], media if first else None)
                first = False
                parts += pieces
                labels += [IGNORE] * (sum(p.shape[0] for p in pieces))
            else:
                answer = self.tok.encode(turn["content"]) + [self.tok.eos_id]
                labels[-1] = answer[0]          # the position before the answer predicts its first token
                parts.append(self._ids(answer))
                labels += answer[1:] + [IGNORE]
        return torch.cat(parts), torch.tensor(labels, device=self.device)

    def prompt_embeddings(self, question: str, media: Media) -> torch.Tensor:
        """[1, L, D]: everything up to and including <assistant>, ready for generation."""
        return torch.cat([self._ids([self.tok.bos_id])] + self._user_turn(question, media))[None]

    def batch_loss(self, samples: list[dict], trained: tuple = (),
                   smoothing: AnswerSmoothing | None = None) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over answer tokens of a batch of SFT samples, and their count; with
        `smoothing`, the first answer tokens' targets are smoothed within their answer type."""
        media = self.encode_media([s["image"] for s in samples], [s["mel"] for s in samples], trained)
        seqs = [self.training_sequence(s["conversation"], m) for s, m in zip(samples, media)]
        longest = max(e.shape[0] for e, _ in seqs)
        if longest > self.thinker.arch.max_seq_len:
            raise ValueError(f"an SFT sequence of {longest} positions exceeds the Thinker's max_seq_len "
                             f"{self.thinker.arch.max_seq_len}")
        embeds = torch.zeros(len(seqs), longest, seqs[0][0].shape[1], device=self.device, dtype=seqs[0][0].dtype)
        labels = torch.full((len(seqs), longest), IGNORE, device=self.device)
        for i, (e, lab) in enumerate(seqs):      # right padding: causal attention never sees it
            embeds[i, :e.shape[0]], labels[i, :lab.shape[0]] = e, lab
        logits = self.thinker(embeds=embeds).float()
        n = int((labels != IGNORE).sum())
        per_token = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        if smoothing is not None:
            per_token = smoothing(per_token, logits, labels, samples, self.tok.eos_id)
        return per_token.sum() / max(n, 1), n

    @torch.no_grad()
    def answer(self, question: str, image=None, mel=None, max_new_tokens: int = 32, temperature: float = 0.0,
               top_k: int = 0, generator=None):
        """Yield the answer's token ids one by one (stops before </s>)."""
        media = self.encode_media([image], [mel])[0]
        for nxt in self.thinker.generate(embeds=self.prompt_embeddings(question, media),
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                         eos_id=self.tok.eos_id, generator=generator):
            if nxt.item() == self.tok.eos_id:
                return
            yield nxt.item()

"""The omni model: the Thinker reading text, image and audio through projectors.

A conversation becomes one embedding sequence:

    <s> <user> [<img> v_1 .. v_N </img>] [<audio> a_1 .. a_M </audio>] question <assistant> answer </s>

where v_i are the vision encoder's patch tokens (`patch_merge` x `patch_merge` neighbours joined
into one) and a_j the audio encoder's frames, each mapped to the Thinker's width by a small MLP
(proj_a, proj_v). Media attach to the first user turn; later turns repeat `<user> question
<assistant> answer </s>`. Training predicts only the answer tokens and their closing </s>;
generation stops at </s>. The same code builds sequences for SFT and for inference, so the two
cannot drift apart.

With `transcribe` (chain of modality, as in SpeechGPT) a spoken question is handled in two steps
by the same Thinker. It listens: `<s> <user> <audio> a_1 .. a_M` -> it writes what it heard and
`</audio>` (trained on the records' transcripts). Then it answers from its own words, the frames
left out: `<s> <user> [<img> ..] <audio> </audio> heard question <assistant> answer </s>`. A spoken
question then reaches the answer as the words the Thinker learnt in Stage A, so what it can answer
typed it can answer spoken (docs/stage_e_sft.md).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
import torch.nn as nn

from omni.layers import pad_stack
from omni.thinker import Thinker
from omni.tokenizer import Tokenizer

IGNORE = -100
VISION_CACHE_BYTES = 512 * 2**20    # OmniModel.vision_cache stops growing here


class Projector(nn.Module):
    """Encoder features -> Thinker embeddings: Linear, GELU, Linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.net(x)


def merge_patches(feats: torch.Tensor, merge: int) -> torch.Tensor:
    """ViT tokens [B, 1+P, D] (CLS first, then a square grid of P patches) -> [B, P/merge^2, merge^2 D]:
    each merge x merge block of neighbouring patches joined into one token (a pixel shuffle of the
    tokens, as nanoVLM does), the CLS token dropped; merge 1 keeps every token, CLS included. Fewer,
    wider tokens: nothing is averaged away, and the sequence is merge^2 times shorter."""
    if merge == 1:
        return feats
    b, n, d = feats.shape
    side = int(round((n - 1) ** 0.5))
    if side * side != n - 1 or side % merge:
        raise ValueError(f"patch_merge {merge}: the vision encoder's {n - 1} patches are not a square grid "
                         f"whose side divides by {merge}")
    grid = feats[:, 1:].reshape(b, side // merge, merge, side // merge, merge, d)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(b, (side // merge) ** 2, merge * merge * d)


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
    heard: str | None = None               # with `transcribe`: what the audio says (the record's transcript
                                           # in training, the Thinker's own reading at inference)


class OmniModel(nn.Module):
    def __init__(self, thinker: Thinker, tokenizer: Tokenizer, proj_a: Projector, proj_v: Projector,
                 audio_encoder: nn.Module | None = None, vision_encoder: nn.Module | None = None,
                 patch_merge: int = 1, transcribe: bool = False):
        super().__init__()
        self.thinker, self.proj_a, self.proj_v = thinker, proj_a, proj_v
        self.audio_encoder, self.vision_encoder = audio_encoder, vision_encoder
        self.patch_merge = patch_merge     # merge_patches: image tokens are merge^2 patches each
        self.transcribe = transcribe       # spoken questions: listen (write the words), then answer from them
        self.tok = tokenizer
        # Stage E's vision_cache sets it to {} (the vision encoder frozen): the ViT's features of each
        # image are then computed once and reused, a step about a third faster on the demo world. An
        # entry is computed for its image alone, never inside a batch, so its numbers do not depend on
        # which batch the image first came in (exact resume holds); that is slower than a batch for
        # images seen once, so it is for small image sets seen every epoch.
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
            if self.vision_cache is not None and "vision" not in trained:
                feats = self._cached_vision(stacked)
            else:
                with torch.set_grad_enabled(grad and "vision" in trained):
                    feats = self._need(self.vision_encoder, "vision")(stacked)
            projected = self.proj_v(merge_patches(feats, self.patch_merge))
            for row, i in enumerate(has_img):
                media[i].image = projected[row]
        has_aud = [i for i, x in enumerate(mels) if x is not None]
        if has_aud:
            with torch.set_grad_enabled(grad and "audio_enc" in trained):
                mel, mask = pad_stack([mels[i] for i in has_aud])
                hidden, hmask = self._need(self.audio_encoder, "audio")(mel.to(self.device), mask.to(self.device))
            projected = self.proj_a(hidden)
            for row, i in enumerate(has_aud):
                media[i].audio = projected[row][hmask[row]]
        return media

    @torch.no_grad()
    def _cached_vision(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen ViT's features [B, 1+P, D] of `images`: from vision_cache where the ViT saw the
        same pixels before, else computed for the image alone and kept while the cache is under
        VISION_CACHE_BYTES."""
        vision = self._need(self.vision_encoder, "vision")
        feats = []
        for image in images:
            key = hashlib.blake2b(image.cpu().numpy().tobytes(), digest_size=16).digest()
            entry = self.vision_cache.get(key)
            if entry is None:
                entry = vision(image[None])[0]
                if self.vision_cache_bytes + entry.nbytes <= VISION_CACHE_BYTES:
                    self.vision_cache[key] = entry
                    self.vision_cache_bytes += entry.nbytes
            feats.append(entry)
        return torch.stack(feats)

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
        if media is not None and media.audio is not None and self.transcribe:
            if media.heard is None:
                raise ValueError("with transcribe, a spoken question is answered from what was heard: listen first")
            parts.append(self._ids([sp["<audio>"], sp["</audio>"]]))     # the sign that the question was spoken
            text = " ".join(t for t in (media.heard, text) if t)        # the words heard, then any typed
        elif media is not None and media.audio is not None:
            parts += [self._ids([sp["<audio>"]]), media.audio, self._ids([sp["</audio>"]])]
        return parts + [self._ids(self.tok.encode(text) + [sp["<assistant>"]])]

    def listening_prompt(self, media: Media) -> torch.Tensor:
        """[L, D]: `<s> <user> <audio> a_1 .. a_M`, after which the Thinker writes what it heard."""
        sp = self.tok.special
        return torch.cat([self._ids([self.tok.bos_id, sp["<user>"], sp["<audio>"]]), media.audio])

    def listening_sequence(self, media: Media) -> tuple[torch.Tensor, torch.Tensor]:
        """(embeddings [L, D], labels [L]) of the listening step: the transcript (media.heard) and
        `</audio>` after the frames are learned, nothing else."""
        heard = self.tok.encode(media.heard) + [self.tok.special["</audio>"]]
        prompt = self.listening_prompt(media)
        labels = [IGNORE] * (prompt.shape[0] - 1) + heard + [IGNORE]
        return torch.cat([prompt, self._ids(heard)]), torch.tensor(labels, device=self.device)

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

    def prompt_length(self, question: str, media: Media) -> int:
        """Positions the longest prompt of an answer takes before anything is generated (with
        `transcribe`: the listening prompt, or the answer's without the words heard)."""
        if media.audio is None or not self.transcribe:
            return self.prompt_embeddings(question, media).shape[1]
        blank = Media(media.image, media.audio, heard="")
        return max(self.listening_prompt(media).shape[0], self.prompt_embeddings(question, blank).shape[1])

    def sequences(self, samples: list[dict], media: list[Media]) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        """(embeddings, labels, sample) per training sequence of a batch: each sample's conversation,
        and with `transcribe` the listening step of each spoken one before it (a sample with a
        transcript and no turns only listens; its sample is then {"kind": "listening"})."""
        seqs = []
        for sample, m in zip(samples, media):
            if m.audio is not None and self.transcribe:
                if not sample.get("transcript"):
                    raise ValueError("transcribe: a spoken sample needs its transcript")
                m.heard = sample["transcript"]
                seqs.append((*self.listening_sequence(m), {"kind": "listening", "conversation": []}))
            if sample["conversation"]:
                seqs.append((*self.training_sequence(sample["conversation"], m), sample))
        return seqs

    def batch_loss(self, samples: list[dict], trained: tuple = (),
                   smoothing: AnswerSmoothing | None = None) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over the learned tokens (answers, and with `transcribe` what was
        heard) of a batch of SFT samples, and their count; with `smoothing`, the first answer
        tokens' targets are smoothed within their answer type."""
        media = self.encode_media([s["image"] for s in samples], [s["mel"] for s in samples], trained)
        seqs = self.sequences(samples, media)
        longest = max(e.shape[0] for e, _, _ in seqs)
        if longest > self.thinker.arch.max_seq_len:
            raise ValueError(f"an SFT sequence of {longest} positions exceeds the Thinker's max_seq_len "
                             f"{self.thinker.arch.max_seq_len}")
        embeds = torch.zeros(len(seqs), longest, seqs[0][0].shape[1], device=self.device, dtype=seqs[0][0].dtype)
        labels = torch.full((len(seqs), longest), IGNORE, device=self.device)
        for i, (e, lab, _) in enumerate(seqs):      # right padding: causal attention never sees it
            embeds[i, :e.shape[0]], labels[i, :lab.shape[0]] = e, lab
        logits = self.thinker(embeds=embeds).float()
        n = int((labels != IGNORE).sum())
        per_token = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE, reduction="none")
        if smoothing is not None:
            per_token = smoothing(per_token, logits, labels, [row for _, _, row in seqs], self.tok.eos_id)
        return per_token.sum() / max(n, 1), n

    @torch.no_grad()
    def listen(self, media: Media, max_new_tokens: int = 48) -> str:
        """What the Thinker hears in media.audio: the words it writes after the frames, greedily, up
        to `</audio>`."""
        end, ids = self.tok.special["</audio>"], []
        for nxt in self.thinker.generate(embeds=self.listening_prompt(media)[None], max_new_tokens=max_new_tokens,
                                         eos_id=end):
            if nxt.item() == end:
                break
            ids.append(nxt.item())
        return self.tok.decode(ids)

    @torch.no_grad()
    def answer(self, question: str, image=None, mel=None, max_new_tokens: int = 32, temperature: float = 0.0,
               top_k: int = 0, generator=None, media: Media | None = None):
        """Yield the answer's token ids one by one (stops before </s>). With `transcribe`, a spoken
        question is listened to first (`listen`; media.heard holds the words after). `media`: the
        encoded image and audio, instead of encoding them again."""
        media = media or self.encode_media([image], [mel])[0]
        if media.audio is not None and self.transcribe and media.heard is None:
            media.heard = self.listen(media)
        for nxt in self.thinker.generate(embeds=self.prompt_embeddings(question, media),
                                         max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                         eos_id=self.tok.eos_id, generator=generator):
            if nxt.item() == self.tok.eos_id:
                return
            yield nxt.item()

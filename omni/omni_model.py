"""The omni model: the Thinker reading text, image and audio through projectors.

A conversation becomes one embedding sequence:

    <s> <user> [<img> v_1 .. v_N </img>] [<audio> a_1 .. a_M </audio> heard] question <assistant> answer </s>

where v_i are the vision encoder's tokens and a_j the audio encoder's frames, each mapped to the
Thinker's width by a small MLP (proj_v, proj_a); `heard` (Stage B's greedy CTC transcript of the
same frames) is there when the model has a transcriber. Media attach to the first user turn;
later turns repeat `<user> question <assistant> answer </s>`. Training predicts only the answer tokens and
their closing </s>; generation stops at </s>. The same code builds sequences for SFT and for
inference, so the two cannot drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from omni.layers import pad_stack
from omni.thinker import Thinker
from omni.tokenizer import Tokenizer

IGNORE = -100


class Projector(nn.Module):
    """Encoder features -> Thinker embeddings: Linear, GELU, Linear."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x):
        return self.net(x)


@dataclass
class Media:
    """Projected features of one sample's image and audio (either may be None)."""
    image: torch.Tensor | None = None      # [N, d_model]
    audio: torch.Tensor | None = None      # [M, d_model]
    transcript: str = ""                   # what the CTC reader heard, when the model has one


class OmniModel(nn.Module):
    def __init__(self, thinker: Thinker, tokenizer: Tokenizer, proj_a: Projector, proj_v: Projector,
                 audio_encoder: nn.Module | None = None, vision_encoder: nn.Module | None = None,
                 transcriber: nn.Module | None = None):
        super().__init__()
        self.thinker, self.proj_a, self.proj_v = thinker, proj_a, proj_v
        self.audio_encoder, self.vision_encoder = audio_encoder, vision_encoder
        self.transcriber = transcriber   # (hidden, mask) -> texts; never trained
        self.tok = tokenizer

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
            with torch.set_grad_enabled(grad and "vision" in trained):
                stacked = torch.stack([images[i] for i in has_img]).to(self.device)
                feats = self._need(self.vision_encoder, "vision")(stacked)
        has_aud = [i for i, x in enumerate(mels) if x is not None]
        if has_aud:
            with torch.set_grad_enabled(grad and "audio_enc" in trained):
                mel, mask = pad_stack([mels[i] for i in has_aud])
                hidden, hmask = self._need(self.audio_encoder, "audio")(mel.to(self.device), mask.to(self.device))
        if has_img:
            projected = self.proj_v(feats)
            for row, i in enumerate(has_img):
                media[i].image = projected[row]
        if has_aud:
            projected = self.proj_a(hidden)
            heard = self.transcriber(hidden, hmask) if self.transcriber is not None else [""] * len(has_aud)
            for row, i in enumerate(has_aud):
                media[i].audio, media[i].transcript = projected[row][hmask[row]], heard[row]
        return media

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

    def batch_loss(self, samples: list[dict], trained: tuple = ()) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy over answer tokens of a batch of SFT samples, and their count."""
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
        logits = self.thinker(embeds=embeds)
        n = int((labels != IGNORE).sum())
        loss = nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                           ignore_index=IGNORE)
        return loss, n

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

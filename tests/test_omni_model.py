"""Stage E's sequence building: where media go, and that only answer tokens are learned."""
import pytest
import torch
import torch.nn as nn

from omni.omni_model import IGNORE, OmniModel, Projector
from omni.thinker import Thinker, ThinkerArch
from omni.tokenizer import Tokenizer


class FakeVision(nn.Module):
    out_dim = 8

    def forward(self, images):                       # 3 tokens per image
        return images.flatten(1)[:, None, :8].repeat(1, 3, 1)


class FakeAudio(nn.Module):
    out_dim = 6

    def forward(self, mel, mask):                    # 2x downsampling
        return mel[:, ::2, :6], mask[:, ::2]


@pytest.fixture(scope="module")
def model(tmp_path_factory, corpus):
    tok = Tokenizer.train([corpus[0]], str(tmp_path_factory.mktemp("tok") / "t.model"), 120)
    torch.manual_seed(0)
    thinker = Thinker(ThinkerArch(vocab_size=128, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=64))
    return OmniModel(thinker, tok, Projector(6, 16), Projector(8, 16), FakeAudio(), FakeVision())


def conversation(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


def test_labels_cover_exactly_the_answer_and_its_end(model):
    tok = model.tok
    media = model.encode_media([torch.zeros(3, 4, 4)], [torch.zeros(7, 80)])[0]
    assert media.image.shape == (3, 16) and media.audio.shape == (4, 16)
    embeds, labels = model.training_sequence(conversation("what colour is the circle?", "red"), media)
    question = tok.encode("what colour is the circle?")
    answer = tok.encode("red") + [tok.eos_id]
    # <s> <user> <img> 3 </img> <audio> 4 </audio> question <assistant> answer
    prompt_len = 2 + 1 + 3 + 1 + 1 + 4 + 1 + len(question) + 1
    assert embeds.shape == (prompt_len + len(answer), 16) and labels.shape == (embeds.shape[0],)
    learned = (labels != IGNORE).nonzero().flatten().tolist()
    assert learned == list(range(prompt_len - 1, prompt_len - 1 + len(answer)))
    assert labels[labels != IGNORE].tolist() == answer
    assert torch.equal(embeds[prompt_len - 1], model.thinker.embed.weight[tok.special["<assistant>"]])


def test_loss_ignores_prompt_and_padding(model):
    tok = model.tok
    samples = [{"conversation": conversation("hi", "hello"), "image": None, "mel": None},
               {"conversation": conversation("what shape is the blue one?", "square"),
                "image": torch.randn(3, 4, 4), "mel": None}]
    loss, n = model.batch_loss(samples)
    assert n == len(tok.encode("hello")) + len(tok.encode("square")) + 2
    loss.backward()
    assert model.proj_v.net[0].weight.grad.abs().sum() > 0      # the image reaches the loss
    assert model.proj_a.net[0].weight.grad is None               # no audio in this batch
    # Padding after the short sample changes nothing: its loss alone equals its part of the batch.
    alone, n_alone = model.batch_loss(samples[:1])
    other, n_other = model.batch_loss(samples[1:])
    assert torch.allclose(loss, (alone * n_alone + other * n_other) / (n_alone + n_other), atol=1e-5)


def test_answer_generation_uses_the_same_prompt(model):
    ids = list(model.answer("hi", max_new_tokens=5))
    assert len(ids) <= 5 and model.tok.eos_id not in ids
    media = model.encode_media([None], [None])[0]
    full, _ = model.training_sequence(conversation("hi", "x"), media)
    prompt = model.prompt_embeddings("hi", media)[0]
    assert torch.equal(full[:prompt.shape[0]], prompt)


class FakeReader(nn.Module):
    def forward(self, hidden, mask):
        return ["what is two plus two"] * hidden.shape[0]


def test_a_transcriber_writes_what_it_heard_before_the_typed_question(model):
    """With audio_transcript, the prompt holds the audio frames and then the words heard, as text."""
    mel = torch.randn(10, 6)
    plain = model.prompt_embeddings("", model.encode_media([None], [mel])[0])
    model.transcriber = FakeReader()
    try:
        media = model.encode_media([None], [mel])[0]
        assert media.transcript == "what is two plus two"
        heard = model.prompt_embeddings("", media)
        typed = model.prompt_embeddings("please", media)
    finally:
        model.transcriber = None
    words = model.tok.encode("what is two plus two")
    assert heard.shape[1] == plain.shape[1] + len(words)
    assert torch.equal(heard[0, -len(words) - 1:-1], model._ids(words))          # right before <assistant>
    assert torch.equal(heard[0, :plain.shape[1] - 1], plain[0, :-1])             # the frames are unchanged
    assert typed.shape[1] == len(model.tok.encode("what is two plus two please")) + plain.shape[1]


def test_without_audio_frames_the_transcript_alone_carries_a_spoken_question(model):
    """audio_frames false: <audio></audio> and the words heard, no frames; proj_a is never used."""
    mel = torch.randn(10, 6)
    model.transcriber = FakeReader()
    model.zero_grad(set_to_none=True)
    try:
        with_frames = model.prompt_embeddings("", model.encode_media([None], [mel])[0])
        model.audio_frames = False
        media = model.encode_media([None], [mel])[0]
        loss, _ = model.batch_loss([{"conversation": conversation("", "four"), "image": None, "mel": mel}])
    finally:
        model.transcriber, model.audio_frames = None, True
    sp, words = model.tok.special, model.tok.encode("what is two plus two")
    assert media.audio.shape == (0, 16) and media.transcript == "what is two plus two"
    prompt = model.prompt_embeddings("", media)[0]
    expected = [model.tok.bos_id, sp["<user>"], sp["<audio>"], sp["</audio>"]] + words + [sp["<assistant>"]]
    assert torch.equal(prompt, model._ids(expected))
    assert with_frames.shape[1] == prompt.shape[0] + 5            # the 5 frames of a 10-step mel
    loss.backward()
    assert model.proj_a.net[0].weight.grad is None and loss.isfinite()


def test_audio_frames_off_needs_the_transcript():
    from omni.config import UserError
    from omni.stages.omni_sft import OmniSFTConfig
    assert OmniSFTConfig(audio_frames=False, audio_transcript=True).audio_frames is False
    with pytest.raises(UserError, match="config key 'audio_frames'"):
        OmniSFTConfig(audio_frames=False, audio_transcript=False)


def test_answer_counts_per_kind_topic_and_caption_words():
    from omni.stages.omni_sft import AnswerCounts
    records = [{"kind": "image_qa", "topic": "colour"}, {"kind": "image_qa", "topic": "shape"},
               {"kind": "speech_qa", "topic": "heldout_sums"}, {"kind": "text"}, {"kind": "caption"},
               {"kind": "asr"}]
    counts = AnswerCounts(records)
    assert counts.names == ["caption_word_acc", "image_acc", "image_colour", "image_shape", "speech_acc",
                            "speech_heldout_sums", "text_acc"]
    counts.add("image_qa", "colour", "red", " red ")
    counts.add("image_qa", "colour", "red", "an red")
    counts.add("image_qa", "shape", "star", "star")
    counts.add("text", None, "hello how can i help", "hello")
    counts.add("caption", "caption", "a big red circle above a small blue star", "a big red circle above a blue star")
    got = counts.results()
    assert got["image_acc"] == 2 / 3 and got["image_colour"] == 0.5 and got["image_shape"] == 1.0
    assert got["text_acc"] == 0.0 and got["caption_word_acc"] == 8 / 9       # one word missing of nine
    assert "speech_acc" not in got                                           # nothing asked: no figure
    # ranks sum one list in one order; a rank that saw no caption still adds its zeros
    other = AnswerCounts(records)
    other.add("speech_qa", "heldout_sums", "nine", "nine")
    mine = [counts.right[k] for k in counts.names] + [counts.asked[k] for k in counts.names]
    merged = other.results(lambda theirs: [a + b for a, b in zip(mine, theirs)])
    assert merged["speech_heldout_sums"] == 1.0 and merged["image_acc"] == 2 / 3
    assert merged["caption_word_acc"] == 8 / 9


# ----------------------------------------------------------------------------- held-out pairs (omni/colours.py)
def image_sample(question, answer, kind="image_qa"):
    return {"conversation": conversation(question, answer), "kind": kind, "image": torch.randn(3, 4, 4), "mel": None}


def test_answer_smoothing_spreads_the_first_answer_token_within_its_type(model):
    from omni.omni_model import AnswerSmoothing
    tok = model.tok
    records = [{"kind": "image_qa", "conversation": conversation(q, a)} for q, a in
               [("what colour is the circle?", "red"), ("what colour is the star?", "blue"),
                ("how many shapes?", "two")]] + \
              [{"kind": "text", "conversation": conversation("what colour is the sky?", "green")}]
    smoothing = AnswerSmoothing(records, tok, eps=0.2)
    colours = sorted({tok.encode("red")[0], tok.encode("blue")[0]})
    assert smoothing.answers == {"what colour": colours}       # one answer alone is no type; text is not counted
    samples = [image_sample("what colour is the square?", "red square"),
               image_sample("what colour is the sky?", "red", kind="text")]
    plain, n = model.batch_loss(samples)
    smoothed, n_smoothed = model.batch_loss(samples, smoothing=smoothing)
    assert n == n_smoothed
    # by hand: only the image question's first answer token changes, to 0.8 CE + 0.2 mean(-log p(type))
    media = model.encode_media([s["image"] for s in samples], [None, None])
    embeds, labels = model.training_sequence(samples[0]["conversation"], media[0])
    logits = model.thinker(embeds=embeds[None])[0].float()
    first = int((labels != IGNORE).nonzero()[0])
    log_p = logits[first].log_softmax(-1)
    change = 0.2 * (-log_p[colours].mean() + log_p[labels[first]])
    assert torch.allclose(smoothed, plain + change / n, atol=1e-5)


def test_colour_apart_shows_the_vit_silhouettes_and_adds_patch_colours(model):
    from omni.colours import silhouette
    seen = []

    class Recording(nn.Module):
        out_dim = 8

        def forward(self, images):               # 1 + 4 tokens: a 2 x 2 grid of patches
            seen.append(images)
            return images.flatten(1)[:, None, :8].repeat(1, 5, 1)

    apart = OmniModel(model.thinker, model.tok, model.proj_a, Projector(8, 16, colour=3), FakeAudio(), Recording())
    red, blue = (torch.full((3, 4, 4), 0.9), torch.full((3, 4, 4), 0.9))
    red[:, 2:, 2:], blue[:, 2:, 2:] = torch.tensor([0.7, -0.8, -0.8])[:, None, None], \
        torch.tensor([-0.7, -0.4, 0.7])[:, None, None]
    tokens = [apart.encode_media([img], [None])[0].image for img in (red, blue)]
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], silhouette(red[None]))
    assert tokens[0].shape == (5, 16)
    assert torch.equal(tokens[0][0], tokens[1][0])                         # CLS: no colour
    assert not torch.allclose(tokens[0][4], tokens[1][4])                  # the object's patch (bottom right)
    assert torch.equal(tokens[0][1], tokens[1][1])                         # a background patch
    with pytest.raises(ValueError, match="colour projector"):
        model.proj_v(torch.zeros(1, 8), torch.zeros(1, 3))


def test_object_tokens_give_one_image_token_per_object_after_the_cls(model):
    from omni.colours import DESCRIPTOR

    class Grid(nn.Module):               # CLS + a 2 x 2 grid of patch tokens
        out_dim = 8

        def forward(self, images):
            return torch.randn(images.shape[0], 5, 8)

    objects = OmniModel(model.thinker, model.tok, model.proj_a, Projector(8, 16, colour=DESCRIPTOR),
                        FakeAudio(), Grid(), objects=True)
    one, two = torch.full((3, 8, 8), 0.9), torch.full((3, 8, 8), 0.9)
    one[:, 1:4, 1:4] = -0.5                # the top-left pixel is the background
    two[:, 1:4, 1:4], two[:, 5:, 5:] = -0.5, 0.1
    media = objects.encode_media([one, None, two], [None, None, None])
    assert media[0].image.shape == (2, 16) and media[1].image is None and media[2].image.shape == (3, 16)
    samples = [{"conversation": conversation("how many shapes are there?", "two"), "image": two, "mel": None},
               {"conversation": conversation("hi", "hello"), "image": None, "mel": None}]
    loss, _ = objects.batch_loss(samples)
    loss.backward()
    assert objects.proj_v.colour[0].weight.grad.abs().sum() > 0


def test_vision_cache_runs_the_frozen_vit_once_per_image_with_the_same_tokens(model, monkeypatch):
    from omni import omni_model
    from omni.colours import DESCRIPTOR
    calls = []

    class Counting(nn.Module):           # CLS + a 2 x 2 grid; each image's tokens depend on it alone
        out_dim = 8

        def forward(self, images):
            calls.append(len(images))
            return images.flatten(1)[:, None, :8].repeat(1, 5, 1) * 2

    proj_v = Projector(8, 16, colour=DESCRIPTOR, outline=64)

    def build():
        return OmniModel(model.thinker, model.tok, model.proj_a, proj_v, FakeAudio(), Counting(), objects=True)
    one, two = torch.full((3, 8, 8), 0.9), torch.full((3, 8, 8), 0.9)
    one[:, 1:4, 1:4] = -0.5
    two[:, 1:4, 1:4], two[:, 5:, 5:] = -0.5, 0.1
    repainted = one.clone()
    repainted[:, 1:4, 1:4] = torch.tensor([0.3, -0.9, 0.2])[:, None, None]   # the same silhouette
    plain = build()
    expected = [m.image for m in plain.encode_media([one, two, repainted], [None] * 3)]
    cached = build()
    cached.vision_cache = {}
    calls.clear()
    first = [m.image for m in cached.encode_media([one, two, repainted], [None] * 3)]
    assert calls == [1, 1]                    # each new silhouette alone; the repainted one is a hit
    again = [m.image for m in cached.encode_media([two, one], [None] * 2)]
    assert calls == [1, 1] and len(cached.vision_cache) == 2
    for got, want in zip(first + again, expected + [expected[1], expected[0]]):
        assert torch.allclose(got, want, atol=1e-6)
    assert not torch.allclose(first[0], first[2])          # the colour still comes from the pixels
    monkeypatch.setattr(omni_model, "VISION_CACHE_BYTES", 0)   # full: computed each time, still right
    full = build()
    full.vision_cache = {}
    assert torch.allclose(full.encode_media([one], [None])[0].image, expected[0], atol=1e-6)
    assert full.vision_cache == {}


def test_vision_cache_needs_a_frozen_vision_encoder():
    from omni.config import UserError
    from omni.stages.omni_sft import OmniSFTConfig
    assert OmniSFTConfig(vision_cache=True).vision_cache is True
    for frozen in ({"train_vision": True}, {"freeze_encoders": False}):
        with pytest.raises(UserError, match="config key 'vision_cache'"):
            OmniSFTConfig(vision_cache=True, **frozen)


def test_object_tokens_need_colour_apart():
    from omni.config import UserError
    from omni.stages.omni_sft import OmniSFTConfig
    assert OmniSFTConfig(object_tokens=True, colour_apart=True).object_tokens is True
    with pytest.raises(UserError, match="config key 'object_tokens'"):
        OmniSFTConfig(object_tokens=True, colour_apart=False)

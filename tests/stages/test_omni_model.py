"""Stage E's sequence building: where media go, and that only answer tokens are learned."""
import pytest
import torch
import torch.nn as nn

from omni.omni_model import IGNORE, Media, OmniModel, Projector, merge_patches
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


def spoken(transcript, answer=None, mel=None):
    return {"conversation": conversation("", answer) if answer else [], "kind": "speech_qa", "image": None,
            "mel": torch.randn(10, 6) if mel is None else mel, "transcript": transcript}


def test_transcribe_listens_to_the_frames_then_answers_from_the_words_alone(model):
    """Chain of modality: `<s> <user> <audio> frames` -> the words heard and </audio> are learned;
    the answer's sequence holds `<audio></audio>` and those words instead of the frames."""
    tok, sp = model.tok, model.tok.special
    words = tok.encode("what is two plus two")
    model.transcribe = True
    try:
        media = model.encode_media([None], [torch.randn(10, 6)])[0]           # 5 frames
        media.heard = "what is two plus two"
        embeds, labels = model.listening_sequence(media)
        prompt = model.listening_prompt(media)
        answer_embeds, answer_labels = model.training_sequence(conversation("", "four"), media)
        rows = model.sequences([spoken("what is two plus two", "four"), spoken("hello there")],
                               model.encode_media([None, None], [torch.randn(10, 6), torch.randn(8, 6)]))
        with pytest.raises(ValueError, match="listen first"):
            model.prompt_embeddings("", Media(audio=media.audio))
    finally:
        model.transcribe = False
    assert prompt.shape[0] == 3 + 5 and torch.equal(embeds[:8], prompt)
    assert torch.equal(prompt[:3], model._ids([tok.bos_id, sp["<user>"], sp["<audio>"]]))
    learned = labels[labels != IGNORE].tolist()
    assert learned == words + [sp["</audio>"]]
    assert (labels != IGNORE).nonzero().flatten().tolist() == list(range(7, 7 + len(words) + 1))
    expected = [tok.bos_id, sp["<user>"], sp["<audio>"], sp["</audio>"]] + words + [sp["<assistant>"]]
    assert torch.equal(answer_embeds[:len(expected)], model._ids(expected))     # no frame in the answer's
    assert answer_labels[answer_labels != IGNORE].tolist() == tok.encode("four") + [tok.eos_id]
    # a spoken conversation gives its listening step and its answer; a transcript without turns only listens
    assert [row["kind"] for _, _, row in rows] == ["listening", "speech_qa", "listening"]


def test_answer_listens_first_and_the_loss_covers_both_steps(model):
    mel = torch.randn(10, 6)
    model.transcribe = True
    try:
        media = model.encode_media([None], [mel])[0]
        ids = list(model.answer("", media=media, max_new_tokens=4))
        heard = media.heard
        model.zero_grad(set_to_none=True)
        loss, n = model.batch_loss([spoken("what is two plus two", "four", mel)])
        assert model.prompt_length("", Media(audio=media.audio)) == 3 + 5
        with pytest.raises(ValueError, match="needs its transcript"):
            model.batch_loss([{**spoken("x", "four", mel), "transcript": None}])
    finally:
        model.transcribe = False
    assert isinstance(heard, str) and len(ids) <= 4           # the Thinker wrote what it heard, then answered
    assert n == len(model.tok.encode("what is two plus two")) + 1 + len(model.tok.encode("four")) + 1
    loss.backward()
    assert model.proj_a.net[0].weight.grad.abs().sum() > 0   # the words heard are learned through the frames


def test_without_transcribe_the_frames_stay_in_the_answers_prompt(model):
    mel = torch.randn(10, 6)
    media = model.encode_media([None], [mel])[0]
    prompt = model.prompt_embeddings("", media)[0]
    sp = model.tok.special
    assert prompt.shape[0] == 2 + 1 + 5 + 1 + 1                   # <s> <user> <audio> 5 </audio> <assistant>
    assert torch.equal(prompt[3:8], media.audio) and media.heard is None
    assert len(model.sequences([spoken("hello", "hi", mel)], [media])) == 1
    assert torch.equal(prompt[-1], model._ids([sp["<assistant>"]])[0])


def test_patch_merge_joins_neighbouring_patches_and_drops_the_cls():
    feats = torch.arange(2 * 17 * 3, dtype=torch.float).reshape(2, 17, 3)    # CLS + a 4 x 4 grid
    merged = merge_patches(feats, 2)
    assert merged.shape == (2, 4, 12)
    grid = feats[:, 1:].reshape(2, 4, 4, 3)
    top_left = torch.cat([grid[:, 0, 0], grid[:, 0, 1], grid[:, 1, 0], grid[:, 1, 1]], dim=-1)
    assert torch.equal(merged[:, 0], top_left)
    assert torch.equal(merged[:, 3, -3:], grid[:, 3, 3])
    assert torch.equal(merge_patches(feats, 1), feats)
    with pytest.raises(ValueError, match="patch_merge 3"):
        merge_patches(feats, 3)


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


def test_vision_cache_runs_the_frozen_vit_once_per_image_with_the_same_tokens(model, monkeypatch):
    from omni import omni_model
    calls = []

    class Counting(nn.Module):           # CLS + a 2 x 2 grid; each image's tokens depend on it alone
        out_dim, num_tokens = 8, 5

        def forward(self, images):
            calls.append(len(images))
            return images.flatten(1)[:, None, :8].repeat(1, 5, 1) * 2

    def build():
        return OmniModel(model.thinker, model.tok, model.proj_a, Projector(32, 16), FakeAudio(), Counting(),
                         patch_merge=2)
    one, two = torch.full((3, 8, 8), 0.9), torch.full((3, 8, 8), 0.9)
    one[:, 0, :3] = -0.5
    two[:, 0, :3], two[:, 5:, 5:] = -0.5, 0.1
    plain = build()
    expected = [m.image for m in plain.encode_media([one, two, one.clone()], [None] * 3)]
    assert expected[0].shape == (1, 16)                       # 4 patches merged into one token, no CLS
    cached = build()
    cached.proj_v = plain.proj_v
    cached.vision_cache = {}
    calls.clear()
    first = [m.image for m in cached.encode_media([one, two, one.clone()], [None] * 3)]
    assert calls == [1, 1]                    # each new image alone; the same pixels again are a hit
    again = [m.image for m in cached.encode_media([two, one], [None] * 2)]
    assert calls == [1, 1] and len(cached.vision_cache) == 2
    for got, want in zip(first + again, expected + [expected[1], expected[0]]):
        assert torch.allclose(got, want, atol=1e-6)
    monkeypatch.setattr(omni_model, "VISION_CACHE_BYTES", 0)   # full: computed each time, still right
    full = build()
    full.proj_v = plain.proj_v
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


@pytest.mark.parametrize("key, value", [("colour_apart", True), ("object_tokens", True), ("audio_frames", False)])
def test_a_model_of_a_removed_demo_world_option_is_refused_in_one_line(key, value, tmp_path):
    """Stage E once had options that worked only on the demo world's pictures (or answered speech from
    Stage B's transcript); a checkpoint trained with them is refused before anything is built."""
    from omni.config import UserError
    from omni.loading import build_omni
    none = str(tmp_path / "none")
    with pytest.raises(UserError, match=f"old: config key '{key}': {value} was a demo-world option") as e:
        build_omni({key: value, "transcribe": True}, none, none, none, "cpu", source="old")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="none"):         # the option's other value is fine: on to the files
        build_omni({key: not value}, none, none, none, "cpu")

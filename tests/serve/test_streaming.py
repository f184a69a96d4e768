"""Streaming speech (issue 39): phrases split from streamed text, the Talker's frames as they come,
chunked codec decoding and vocoding equal to whole decoding, Chat.talk's events on tiny trained
models, and infer.py --audio_out written from the streamed chunks."""
import os

import pytest
import soundfile as sf
import torch
from test_evaluate import stages  # noqa: F401 (fixture: the five stages trained tiny)
from test_talker import NQ, K, sharpen, tiny_talker

from conftest import run_script
from omni.chat import Chat
from omni.codec import CodecArch, SpeechCodec
from omni.config import UserError
from omni.generation import Speaker
from omni.loading import load_speaker
from omni.speech_stream import PhraseSplitter, chunked_wave
from omni.talker import text_to_ids
from omni.vocoder import GriffinLimVocoder, NeuralVocoder, VocoderArch


def split(pieces, **kw) -> list[str]:
    splitter = PhraseSplitter(**kw)
    return [phrase for piece in pieces for phrase in splitter.push(piece)] + splitter.end()


# ----------------------------------------------------------------------------- phrases
def test_the_first_phrase_is_short_and_later_ones_end_at_punctuation_or_a_word_limit():
    text = "a big yellow diamond, a big red square and a small orange star above a green circle. yes"
    assert split([text], first_words=3, words=6) == [
        "a big yellow", "diamond,", "a big red square and a small", "orange star above a green circle.", "yes"]
    assert split(["i am a small model"]) == ["i am a small", "model"]      # never cut after a one- or two-letter word


def test_phrases_do_not_depend_on_where_the_pieces_split_words():
    text = "the big red circle is left of a small blue square, next to it. seven"
    whole = split([text])
    assert split(list(text)) == split([text[:5], text[5:17], text[17:]]) == whole
    assert whole == ["the big red", "circle is left of a small blue square,", "next to it.", "seven"]


def test_a_phrase_waits_for_the_space_after_its_last_word():
    splitter = PhraseSplitter(first_words=2)
    assert splitter.push("two plu") == [] and splitter.push("s") == []      # "plus" may go on
    assert splitter.push(" three") == ["two plus"]
    assert splitter.push("!") == [] and splitter.end() == ["three!"]


def test_punctuation_alone_is_not_a_phrase():
    assert split([". , ?! a ; ."]) == ["a ;"]
    assert split(["  ", "..."]) == []


# ----------------------------------------------------------------------------- frames and chunks
def test_the_talkers_stream_yields_the_frames_of_generate():
    talker = sharpen(tiny_talker(1, text_window=2))
    text = text_to_ids("a big blue star")
    for temperature in (0.0, 0.9):
        frames = list(talker.stream(text, temperature, generator=torch.Generator().manual_seed(3)))
        codes = talker.generate(text, temperature, generator=torch.Generator().manual_seed(3))
        assert len(frames) == len(codes) > 0 and torch.equal(torch.stack(frames), codes)


@pytest.fixture
def codec():
    torch.manual_seed(0)
    return SpeechCodec(CodecArch(codec_channels=16, latent_dim=8, codebook_size=K, n_codebooks=NQ)).eval()


@torch.no_grad()
def test_decode_context_is_the_decoders_receptive_field(codec):
    f, context = codec.arch.downsample, codec.decode_context
    assert context == 9                      # dec_in 1 + dilations 1, 2, 4 + the mel-rate smoothing 1
    codes = torch.randint(0, K, (60, NQ))
    whole = codec.decode(codes[None])[0]
    changed = codes.clone()
    changed[30] = (changed[30] + 1) % K
    moved = (codec.decode(changed[None])[0] - whole).abs().sum(-1).nonzero().flatten()
    assert moved.min() // f >= 30 - context and moved.max() // f <= 30 + context    # no further than it says
    assert moved.max() // f == 30 + context                                           # and it is needed
    for a, b in [(0, 25), (5, 40), (20, 60), (0, 60)]:
        chunk = codec.decode(codes[a:b][None])[0]
        keep_from, keep_to = (a + context if a else 0), (b - context if b < 60 else 60)
        assert torch.allclose(chunk[(keep_from - a) * f:(keep_to - a) * f], whole[keep_from * f:keep_to * f],
                              atol=1e-5)


class ConvVocoder(torch.nn.Module):
    """An exact vocoder: one convolution over 5 mel frames, then 160 samples a frame."""
    sample_rate, hop, context_frames = 16000, 160, 2

    def __init__(self, n_mels: int = 80):
        super().__init__()
        self.conv = torch.nn.Conv1d(n_mels, self.hop, 5, padding=2)

    @torch.no_grad()
    def mel_to_wave(self, mel):
        return torch.tanh(self.conv(mel.T[None])[0].T[:-1].reshape(-1) / 10)


def neural_vocoder(refine_iters: int = 0):
    """Stage F's vocoder, random; exact without the Griffin-Lim refinement it runs at synthesis."""
    torch.manual_seed(1)
    vocoder = NeuralVocoder(VocoderArch(vocoder_dim=16, vocoder_layers=2, vocoder_ffn=32), refine_iters=refine_iters)
    vocoder.eval()
    with torch.no_grad():
        vocoder.head.weight.normal_(0, 0.05)       # a head that does something (it starts at zero)
    return vocoder


@pytest.mark.parametrize("make_vocoder", [ConvVocoder, neural_vocoder])
@pytest.mark.parametrize("frames", [1, 7, 30, 90])
def test_chunked_decoding_and_vocoding_equal_the_whole(codec, make_vocoder, frames):
    vocoder = make_vocoder()
    codes = torch.randint(0, K, (frames, NQ), generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        whole = vocoder.mel_to_wave(codec.decode(codes[None])[0])
    chunks = list(chunked_wave(iter(codes), codec, vocoder, first_chunk=4, max_chunk=32))
    assert len(whole) == (frames * codec.arch.downsample - 1) * vocoder.hop
    assert torch.allclose(torch.cat(chunks), whole, atol=1e-5)
    if frames == 90:
        assert len(chunks) >= 4 and len(chunks[0]) < len(chunks[2])      # small first, then growing


@pytest.mark.parametrize("vocoder, tolerance", [(GriffinLimVocoder(n_iter=8), 0.25),
                                                (neural_vocoder(refine_iters=32), 1e-3)])
def test_iterative_vocoders_chunk_close_to_the_whole(codec, vocoder, tolerance):
    """Griffin-Lim reaches across the whole input: close, not equal. The neural vocoder's refinement
    is exact within its context_frames but amplifies float rounding (1e-4 of the signal here)."""
    codes = torch.randint(0, K, (90, NQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vocoder.mel_to_wave(codec.decode(codes[None])[0])
    streamed = torch.cat(list(chunked_wave(iter(codes), codec, vocoder)))
    assert streamed.shape == whole.shape and (streamed - whole).norm() < tolerance * whole.norm()


def test_a_streamed_phrase_is_the_whole_phrase_spoken(codec):
    talker = sharpen(tiny_talker(2))
    with torch.no_grad():
        talker.heads[0].bias[K] = -1e9          # no end of speech: as long as the frame limit allows
    speaker = Speaker(talker, codec, neural_vocoder())
    for temperature in (0.0, 0.8):
        whole = speaker.speak("a big red", temperature=temperature, seed=4)
        chunks = list(speaker.stream(["a b", "ig r", "ed"], temperature=temperature, seed=4))
        assert len(chunks) > 1 and torch.allclose(torch.cat(chunks), whole, atol=1e-5)
    pieces = ["two", " plus", " three", " is", " five"]
    mixed = list(speaker.stream(pieces, with_text=True))
    assert [x for x in mixed if isinstance(x, str)] == pieces
    assert isinstance(mixed[0], str) and not isinstance(mixed[-1], str)
    phrases = torch.cat([speaker.speak("two plus three"), speaker.speak("is five")])
    assert torch.allclose(torch.cat([x for x in mixed if not isinstance(x, str)]), phrases, atol=1e-5)
    assert list(speaker.stream(["?!"])) == []


# ----------------------------------------------------------------------------- Chat.talk and infer.py
@pytest.fixture(scope="module")
def chat(stages):  # noqa: F811
    """Sampling (seeded per answer, so each answer repeats): the 8-step tiny model often answers
    nothing greedily."""
    return Chat(stages["E"]["save_dir"], torch.device("cpu"), talker_dir=stages["D"]["save_dir"], max_new_tokens=12,
                temperature=1.0)


@pytest.fixture(scope="module")
def question(chat) -> str:
    """A typed question the tiny model answers with something to say."""
    questions = ["describe the picture", "what is two plus three?", "what colour is a lemon?", "are you a robot?"]
    return next(q for q in questions if any(c.isalnum() for c in "".join(chat.answer(q))))


def test_talk_yields_text_and_audio_as_they_come_then_done(chat, question):
    events = list(chat.talk(question))
    kinds = [e["type"] for e in events]
    assert kinds[-1] == "done" and "done" not in kinds[:-1] and kinds[0] == "text" and "audio" in kinds
    done, texts = events[-1], [e["text"] for e in events if e["type"] == "text"]
    audio = [e["samples"] for e in events if e["type"] == "audio"]
    assert done["text"] == "".join(texts) == "".join(chat.answer(question)) and done["tokens"] > 0
    assert all(a.dtype == torch.float32 and a.dim() == 1 and a.abs().max() <= 1 for a in audio)
    assert done["audio_s"] == pytest.approx(sum(len(a) for a in audio) / chat.sample_rate)
    assert 0 < done["first_text_s"] < done["ttfa_s"] < done["seconds"]
    assert done["rtf"] > 0 and done["tokens_per_s"] > 0
    # the chunks are the Speaker's stream of the same text: phrases do not depend on the pieces
    spoken = torch.cat(list(chat.speaker.stream([done["text"]])))
    assert torch.equal(torch.cat(audio), spoken)


def test_talk_without_speech_and_bad_input_before_any_event(chat, tmp_path):
    events = list(chat.talk("what is two plus three?", speak=False))
    assert [e["type"] for e in events[:-1]] == ["text"] * (len(events) - 1)
    assert events[-1]["ttfa_s"] is None and events[-1]["rtf"] is None and events[-1]["audio_s"] == 0
    with pytest.raises(UserError, match="gone.png"):
        chat.talk("what colour?", image_path=str(tmp_path / "gone.png"))       # raised by the call itself


def test_a_spoken_question_is_heard_first_then_answered_from_the_words(chat, demo_tiny):
    """transcribe (the tiny configs' Stage E): the first event is what the model heard, the words it
    answers from; the answer is the one the model gives to those words."""
    import json
    record = next(json.loads(line) for line in open(f"{demo_tiny}/sft_val.jsonl") if '"audio"' in line)
    events = list(chat.talk("", audio_path=os.path.join(demo_tiny, record["audio"]), speak=False))
    assert events[0]["type"] == "heard" and [e["type"] for e in events[1:]].count("heard") == 0
    heard = events[0]["text"]
    assert heard == chat.heard and isinstance(heard, str)
    media = chat.model.encode_media([None], [None])[0]
    media.audio, media.heard = torch.zeros(1, 1), heard         # the words alone: frames never reach the answer
    ids = chat.model.answer("", max_new_tokens=chat.max_new_tokens, temperature=chat.temperature, media=media,
                            generator=torch.Generator().manual_seed(chat.seed))
    assert events[-1]["text"] == chat.tokenizer.decode(list(ids))
    list(chat.talk("what is two plus three?", speak=False))
    assert chat.heard is None                               # a typed question is not listened to


def test_infer_writes_the_streamed_speech_into_a_playable_wav(stages, question, tmp_path):  # noqa: F811
    out = str(tmp_path / "answer.wav")
    proc = run_script("infer.py", "--ckpt_dir", stages["E"]["save_dir"], "--talker_dir", stages["D"]["save_dir"],
                      "--vocoder_dir", "", "--text", question, "--max_new_tokens", "12", "--temperature", "1",
                      "--audio_out", out, check=True)
    answer, note = proc.stdout.splitlines()[:2]
    data, rate = sf.read(out, dtype="float32")
    assert rate == 16000 and sf.info(out).subtype == "PCM_16" and sf.info(out).channels == 1
    streamed = torch.cat(list(load_speaker(stages["D"]["save_dir"]).stream([answer])))
    assert len(data) == len(streamed) > 0 and note == f"[spoken into {out}: {len(data) / 16000:.2f} s at 16000 Hz]"
    assert abs(data - streamed.clamp(-1, 1).numpy()).max() <= 1 / 32767 + 1e-6     # PCM_16 rounding
    said = str(tmp_path / "said.wav")
    run_script("infer.py", "--talker_dir", stages["D"]["save_dir"], "--vocoder_dir", "", "--say", answer,
               "--audio_out", said, check=True)
    assert len(sf.read(said)[0]) == len(data) and os.path.getsize(said) == os.path.getsize(out)


def test_the_bench_prints_ttfa_and_rtf_of_both_paths():
    proc = run_script("bench/bench_streaming.py", "--random", "--rounds", "1", "--questions", "a red circle",
                      "what is one plus two?", "--max_new_tokens", "12", check=True)
    table = proc.stdout.splitlines()[proc.stdout.splitlines().index("| figure | median | max |") + 2:]
    rows = [line.split("|")[1:-1] for line in table]
    assert [cells[0].strip() for cells in rows] == [
        "TTFA ms, streaming, 1 thread", "TTFA ms, whole answer then whole sentence, 1 thread",
        "RTF, streaming, 1 thread", "RTF, whole sentence, 1 thread"]
    assert all(float(cell) > 0 for cells in rows for cell in cells[1:]), proc.stdout

"""The BPE tokenizer: deterministic training, fixed special ids, lossless round trip."""
from omni.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, Tokenizer


def test_training_is_deterministic_and_special_ids_are_fixed(tmp_path, corpus):
    a = Tokenizer.train([corpus[0]], str(tmp_path / "a.model"), 120)
    b = Tokenizer.train([corpus[0]], str(tmp_path / "b.model"), 120)
    assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert [a.special[t] for t in SPECIAL_TOKENS] == list(range(4, 4 + len(SPECIAL_TOKENS)))
    assert a.sp.id_to_piece(PAD) == "<pad>" and a.sp.id_to_piece(BOS) == "<s>" and b.vocab_size <= 120


def test_round_trip_and_markers(tmp_path, corpus):
    tok = Tokenizer.train([corpus[0]], str(tmp_path / "t.model"), 120)
    text = "a small red circle is above a big blue square"
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == BOS and ids[-1] == EOS and tok.decode(ids) == text
    assert tok.encode("<img>")[-1] == tok.special["<img>"]       # a marker is one piece
    assert tok.decode([tok.special["<img>"]] + tok.encode("red")) == "red"

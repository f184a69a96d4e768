"""Export formats of omni.export: the Thinker as a transformers Llama (hf) and a llama.cpp GGUF file,
and the weights-only .pt. A tiny Thinker is trained once (about 10 s) so that greedy text means something."""
import os
import random
import re

import pytest
import torch

from conftest import load_pt, run_script, thinker_config, write_config
from omni import checkpoint as ckpt
from omni.config import UserError
from omni.export import export
from omni.generation import generate_text
from omni.layers import apply_rope, rope_tables
from omni.loading import load_thinker
from omni.tokenizer import SPECIAL_TOKENS

PROMPTS = ["a small red", "a big blue square is", "a green triangle is left of"]


@pytest.fixture(scope="module")
def thinker(corpus, tmp_path_factory):
    """(folder, val sentences) of a tiny Thinker trained to about perplexity 4 on shape sentences."""
    root = tmp_path_factory.mktemp("thinker")
    cfg = thinker_config(corpus, root / "thinker", max_steps=80, dropout=0.0, seq_len=32, eval_interval=40,
                         checkpoint_freq=40)
    run_script("train_text.py", "--config", write_config(root / "a.json", cfg), check=True)
    with open(corpus[1]) as f:
        return cfg["save_dir"], f.read().splitlines()


def tokenizer_cases(sentences: list[str]) -> list[str]:
    """Corpus sentences, odd spacing, characters the vocabulary lacks, and special tokens in text."""
    rng = random.Random(0)
    odd = ["", " ", "  a  small   red\tcircle \n", "\u3000a red\u00a0circle", "ＡＢＣ ﬁ circle", "a red 你好 ø é",
           "x <user> a red<assistant>", "a<img></img> <audio>red</audio>", "<s> a red </s>", "<pad><unk>",
           "a red.", "A RED CIRCLE!", "red\n\nblue"]
    noisy = [" ".join(s.split()[:rng.randint(1, 6)]) + rng.choice(["", " ", "  ", "?"]) for s in sentences[:40]]
    return sentences[:40] + noisy + odd


def suite_logits(folder_or_model, ids):
    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = load_thinker(model, "cpu")[0]
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


def test_hf_export_gives_the_suites_logits_greedy_text_and_token_ids(thinker, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, sentences = thinker
    out = str(tmp_path / "hf")
    proc = run_script("-m", "omni.export", "--ckpt", folder, "--out", out, "--format", "hf", check=True)
    assert "model.safetensors" in proc.stdout and "tokenizer.json" in proc.stdout
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    thinker_model, tok = load_thinker(folder, "cpu")
    assert model.config.tie_word_embeddings and model.config.num_key_value_heads == thinker_model.arch.n_kv_heads

    for text in tokenizer_cases(sentences):
        assert hf_tok(text)["input_ids"] == tok.encode(text, bos=True), repr(text)

    worst = 0.0
    for prompt in PROMPTS + sentences[:3]:
        ids = tok.encode(prompt, bos=True)
        with torch.no_grad():
            hf_logits = model(torch.tensor([ids])).logits[0]
        worst = max(worst, (hf_logits - suite_logits(thinker_model, ids)).abs().max().item())
    assert worst <= 1e-4

    for prompt in PROMPTS:
        ours = "".join(generate_text(thinker_model, tok, prompt, max_new_tokens=24))
        ids = hf_tok(prompt, return_tensors="pt")["input_ids"]
        gen = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
        theirs = hf_tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
        assert len(ours.split()) >= 3 and theirs == ours, (prompt, ours, theirs)


def stage_e_checkpoint(thinker_folder: str, path) -> dict:
    """A Stage E-shaped checkpoint whose Thinker differs from the Stage A one it names."""
    obj = load_pt(os.path.join(thinker_folder, "thinker.pt"))
    gen = torch.Generator().manual_seed(1)
    sd = {name: t + 0.05 * torch.randn(t.shape, generator=gen) for name, t in obj["model"].items()}
    sd["head.weight"] = sd["embed.weight"]
    e = {"thinker": sd, "proj_a": {"w": torch.zeros(2)}, "proj_v": {"w": torch.zeros(2)}, "step": 5,
         "format_version": ckpt.FORMAT_VERSION, "config": {"thinker_dir": thinker_folder, "audio_enc_dir": "x",
                                                          "vision_dir": "y"}}
    ckpt.save(str(path), e)
    return sd


def test_hf_export_of_the_thinker_inside_a_stage_e_checkpoint(thinker, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder, _ = thinker
    os.makedirs(tmp_path / "omni")
    sd = stage_e_checkpoint(folder, tmp_path / "omni" / "omni.pt")
    export(str(tmp_path / "omni"), str(tmp_path / "hf"), "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    thinker_model, tok = load_thinker(folder, "cpu")
    thinker_model.load_state_dict(sd)
    ids = tok.encode(PROMPTS[0], bos=True)
    with torch.no_grad():
        delta = (model(torch.tensor([ids])).logits[0] - suite_logits(thinker_model, ids)).abs().max().item()
    assert delta <= 1e-4


def interleaved_rope(x, theta: float):
    """llama.cpp's rotation for the llama architecture: adjacent pairs (x[2i], x[2i+1]) of x [T, D]."""
    T, D = x.shape
    angles = torch.outer(torch.arange(T).float(), 1.0 / theta ** (torch.arange(0, D, 2).float() / D))
    even, odd = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2], out[:, 1::2] = even * angles.cos() - odd * angles.sin(), even * angles.sin() + odd * angles.cos()
    return out


def test_gguf_row_order_turns_rotate_half_into_llama_cpp_rope():
    from omni.export_llama import interleave_rope_rows
    gen = torch.Generator().manual_seed(0)
    d, heads, T = 8, 2, 5
    wq, wk, x = (torch.randn(heads * d, 12, generator=gen), torch.randn(heads * d, 12, generator=gen),
                 torch.randn(T, 12, generator=gen))
    cos, sin = rope_tables(d, T, 500.0)
    for h in range(heads):
        rows = slice(h * d, (h + 1) * d)
        q, k = (x @ wq.T)[:, rows], (x @ wk.T)[:, rows]
        suite = apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).T
        q2, k2 = (x @ interleave_rope_rows(wq, heads).T)[:, rows], (x @ interleave_rope_rows(wk, heads).T)[:, rows]
        cpp = interleaved_rope(q2, 500.0) @ interleaved_rope(k2, 500.0).T
        assert torch.allclose(suite, cpp, atol=1e-5)
        assert not torch.allclose(suite, interleaved_rope(q, 500.0) @ interleaved_rope(k, 500.0).T, atol=1e-3)


def thinker_from_gguf(path: str, folder: str):
    """The suite's Thinker rebuilt from the GGUF tensors (undoing the row order), to compare logits."""
    import gguf
    model, _ = load_thinker(folder, "cpu")
    a = model.arch
    n_kv, half = a.n_kv_heads, a.d_model // a.n_heads // 2

    def rope_rows_back(w, heads):
        return w.reshape(heads, half, 2, -1).transpose(1, 2).reshape(w.shape)

    t = {x.name: torch.from_numpy(x.data.copy()).float().reshape([int(n) for n in reversed(x.shape)])
         for x in gguf.GGUFReader(path).tensors}
    sd = {"embed.weight": t["token_embd.weight"], "head.weight": t["token_embd.weight"],
          "body.norm.weight": t["output_norm.weight"]}
    for i in range(a.n_layers):
        b, s = f"blk.{i}.", f"body.blocks.{i}."
        sd.update({s + "attn_norm.weight": t[b + "attn_norm.weight"], s + "mlp_norm.weight": t[b + "ffn_norm.weight"],
                   s + "attn.q.weight": rope_rows_back(t[b + "attn_q.weight"], a.n_heads),
                   s + "attn.kv.weight": torch.cat([rope_rows_back(t[b + "attn_k.weight"], n_kv),
                                                    t[b + "attn_v.weight"]]),
                   s + "attn.out.weight": t[b + "attn_output.weight"], s + "mlp.down.weight": t[b + "ffn_down.weight"],
                   s + "mlp.gate_up.weight": torch.cat([t[b + "ffn_gate.weight"], t[b + "ffn_up.weight"]])})
    model.load_state_dict(sd)
    return model


def test_gguf_file_metadata_vocabulary_and_weights_read_back(thinker, tmp_path):
    gguf = pytest.importorskip("gguf")
    folder, _ = thinker
    paths = {d: export(folder, str(tmp_path), "gguf", d)[0] for d in ("f32", "f16")}
    model, tok = load_thinker(folder, "cpu")
    a = model.arch
    reader = gguf.GGUFReader(paths["f32"])
    meta = {k: f.contents() for k, f in reader.fields.items()}
    expect = {"general.architecture": "llama", "llama.block_count": a.n_layers, "llama.embedding_length": a.d_model,
              "llama.attention.head_count": a.n_heads, "llama.attention.head_count_kv": a.n_kv_heads,
              "llama.context_length": a.max_seq_len, "llama.rope.freq_base": a.rope_theta,
              "llama.rope.dimension_count": a.d_model // a.n_heads, "tokenizer.ggml.model": "llama",
              "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 3, "tokenizer.ggml.unknown_token_id": 1,
              "tokenizer.ggml.padding_token_id": 0, "tokenizer.ggml.add_bos_token": True}
    assert {k: meta.get(k) for k in expect} == expect
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    tokens = meta["tokenizer.ggml.tokens"]
    assert len(tokens) == a.vocab_size and tokens[:len(pieces)] == pieces
    types = meta["tokenizer.ggml.token_type"]
    assert [types[tok.special[t]] for t in SPECIAL_TOKENS] == [gguf.TokenType.USER_DEFINED] * len(SPECIAL_TOKENS)
    assert types[2] == types[3] == gguf.TokenType.CONTROL and types[1] == gguf.TokenType.UNKNOWN
    names = {t.name: (list(t.shape), t.tensor_type.name) for t in reader.tensors}
    assert "output.weight" not in names and len(names) == 2 + 9 * a.n_layers
    assert names["token_embd.weight"] == ([a.d_model, a.vocab_size], "F32")   # GGUF lists the fastest axis first
    assert names["blk.0.attn_k.weight"][0] == [a.d_model, a.n_kv_heads * a.d_model // a.n_heads]
    half = {t.name: t.tensor_type.name for t in gguf.GGUFReader(paths["f16"]).tensors}
    assert half["blk.0.attn_q.weight"] == "F16" and half["blk.0.attn_norm.weight"] == "F32"
    assert os.path.getsize(paths["f16"]) < 0.6 * os.path.getsize(paths["f32"])

    ids = tok.encode(PROMPTS[1], bos=True)
    reference = suite_logits(model, ids)
    assert (suite_logits(thinker_from_gguf(paths["f32"], folder), ids) - reference).abs().max() <= 1e-6
    assert (suite_logits(thinker_from_gguf(paths["f16"], folder), ids) - reference).abs().max() <= 5e-2


def test_llama_cpp_continues_the_gguf_like_infer(thinker, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    folder, _ = thinker
    path = export(folder, str(tmp_path), "gguf", "f32")[0]
    model, tok = load_thinker(folder, "cpu")
    # type_k/type_v 0 (GGML_TYPE_F32): llama.cpp's default f16 KV cache alone moves logits by about 1e-3.
    llm = llama_cpp.Llama(model_path=path, n_ctx=model.arch.max_seq_len, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    for prompt in PROMPTS:
        ids = tok.encode(prompt, bos=True)
        assert llm.tokenize(prompt.encode()) == ids
        ours = "".join(generate_text(model, tok, prompt, max_new_tokens=24))
        theirs = llm(prompt, max_tokens=24, temperature=0.0, top_k=1)["choices"][0]["text"]
        assert theirs.strip() == ours.strip(), (prompt, ours, theirs)
        llm.reset()
        llm.eval(ids)
        delta = (torch.tensor(llm.scores[:len(ids)]) - suite_logits(model, ids)).abs().max().item()
        assert delta <= 1e-4


def test_pt_export_is_weights_only_and_loads_for_inference_init_and_inspect(thinker, tmp_path):
    from omni.inspect import describe
    folder, _ = thinker
    out = tmp_path / "pt"
    export(folder, str(out), "pt")
    full, slim = os.path.join(folder, "thinker_best.pt"), str(out / "thinker.pt")
    assert os.path.getsize(slim) < 0.45 * os.path.getsize(full)
    info = describe(str(out))
    assert info["format"] == "weights-only" and info["training_state"] == [] and info["config"]["d_model"] == 32
    (a, _tok), (b, _) = load_thinker(folder, "cpu"), load_thinker(str(out), "cpu")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    cfg = load_pt(full)["config"] | {"save_dir": str(tmp_path / "again"), "max_steps": 1, "warmup_steps": 0,
                                     "tokenizer_model": os.path.join(folder, "tokenizer.model")}
    proc = run_script("train_text.py", "--config", write_config(tmp_path / "b.json", cfg), "--init_from", slim)
    assert proc.returncode == 0 and "initialised weights from" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_export_errors_are_one_line_naming_what_to_do(thinker, tmp_path, monkeypatch):
    os.makedirs(tmp_path / "vision")
    ckpt.save(str(tmp_path / "vision" / "vision.pt"), {"vit": {"w": torch.zeros(1)}, "config": {},
                                                        "format_version": ckpt.FORMAT_VERSION})
    proc = run_script("-m", "omni.export", "--ckpt", str(tmp_path / "vision"), "--out", str(tmp_path / "o"),
                      "--format", "hf")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "stage C (vision)" in proc.stderr and "stage A (thinker) or stage E (omni)" in proc.stderr
    with pytest.raises(UserError, match="--dtype f16"):
        export(thinker[0], str(tmp_path / "o"), "pt", "f16")
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)    # as if gguf were not installed
    with pytest.raises(UserError, match=re.escape("pip install -e '.[export]'")):
        export(thinker[0], str(tmp_path / "o"), "gguf")
    assert not os.path.exists(tmp_path / "o" / "thinker-f32.gguf")

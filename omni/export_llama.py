"""The Thinker as a Llama: a Hugging Face folder (`--format hf`) and a GGUF file for llama.cpp (`--format gguf`).

The Thinker is architecturally a Llama: pre-norm RMSNorm (eps 1e-6, normalised in fp32, cast back
before the weight), rotary positions in the rotate-half layout with inv_freq = theta^(-2i/head_dim),
SwiGLU, grouped-query attention without biases, and an output head tied to the embedding. Only the
layout of a few tensors differs:

  suite                           Llama (transformers)                    GGUF (llama.cpp, arch "llama")
  embed.weight                    model.embed_tokens.weight               token_embd.weight
  body.blocks.N.attn_norm         model.layers.N.input_layernorm          blk.N.attn_norm
  body.blocks.N.attn.q            ...self_attn.q_proj                     blk.N.attn_q   (rows interleaved)
  body.blocks.N.attn.kv = [k; v]  ...self_attn.k_proj, v_proj             blk.N.attn_k   (rows interleaved), attn_v
  body.blocks.N.attn.out          ...self_attn.o_proj                     blk.N.attn_output
  body.blocks.N.mlp_norm          ...post_attention_layernorm             blk.N.ffn_norm
  body.blocks.N.mlp.gate_up       ...mlp.gate_proj, up_proj               blk.N.ffn_gate, ffn_up
  = [gate; up]
  body.blocks.N.mlp.down          ...mlp.down_proj                        blk.N.ffn_down
  body.norm.weight                model.norm.weight                       output_norm.weight
  head.weight (tied)              absent (tie_word_embeddings)            absent (llama.cpp reuses token_embd)

llama.cpp's llama architecture rotates adjacent pairs (x[2i], x[2i+1]) where transformers and the
suite rotate (x[i], x[i + head_dim/2]); the GGUF q and k rows are reordered per head so that the
same pairs meet (attention scores are unchanged by a permutation shared by q and k).

The tokenizer: transformers gets a `tokenizer.json` rebuilt from the SentencePiece model (BPE merges
from the piece scores, the model's own NFKC normalisation table, whitespace collapsed and stripped
like SentencePiece's remove_extra_whitespaces, "▁" word prefix, `<s>` prepended). It gives the
suite's `Tokenizer.encode(text, bos=True)` ids, with one exception: a text that *starts* with a span
marker (`<user>...`), where SentencePiece puts a lone "▁" before the marker. GGUF stores the
SentencePiece vocabulary (pieces, scores, types), which llama.cpp's "llama" tokenizer reads;
llama.cpp does not apply NFKC nor collapse repeated spaces.
"""
from __future__ import annotations

import os
import shutil

import torch

from omni.checkpoint import atomic_write, write_json
from omni.config import UserError
from omni.layers import RMSNorm
from omni.thinker import ThinkerArch
from omni.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK

RMS_EPS = RMSNorm(1).eps
EXTRA = "pip install -e '.[export]'"


def llama_tensors(sd: dict[str, torch.Tensor], arch: ThinkerArch) -> dict[str, torch.Tensor]:
    """The Thinker's state_dict under transformers' LlamaForCausalLM names (tied head left out)."""
    kv_rows = arch.n_kv_heads * (arch.d_model // arch.n_heads)
    out = {"model.embed_tokens.weight": sd["embed.weight"], "model.norm.weight": sd["body.norm.weight"]}
    for i in range(arch.n_layers):
        src, dst = f"body.blocks.{i}.", f"model.layers.{i}."
        k, v = sd[src + "attn.kv.weight"].split(kv_rows)
        gate, up = sd[src + "mlp.gate_up.weight"].chunk(2)
        out.update({dst + "input_layernorm.weight": sd[src + "attn_norm.weight"],
                    dst + "self_attn.q_proj.weight": sd[src + "attn.q.weight"],
                    dst + "self_attn.k_proj.weight": k, dst + "self_attn.v_proj.weight": v,
                    dst + "self_attn.o_proj.weight": sd[src + "attn.out.weight"],
                    dst + "post_attention_layernorm.weight": sd[src + "mlp_norm.weight"],
                    dst + "mlp.gate_proj.weight": gate, dst + "mlp.up_proj.weight": up,
                    dst + "mlp.down_proj.weight": sd[src + "mlp.down.weight"]})
    return {name: t.detach().float().contiguous() for name, t in out.items()}


def hf_config(arch: ThinkerArch, ffn_hidden: int, dtype: str) -> dict:
    """config.json of a LlamaForCausalLM with the Thinker's shape."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": arch.vocab_size,
            "hidden_size": arch.d_model, "intermediate_size": ffn_hidden, "num_hidden_layers": arch.n_layers,
            "num_attention_heads": arch.n_heads, "num_key_value_heads": arch.n_kv_heads,
            "head_dim": arch.d_model // arch.n_heads, "hidden_act": "silu",
            "max_position_embeddings": arch.max_seq_len, "rms_norm_eps": RMS_EPS,
            "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
            "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD, "use_cache": True,
            "dtype": {"f32": "float32", "f16": "float16"}[dtype]}


def sentencepiece_proto(path: str):
    """The parsed SentencePiece ModelProto (pieces, scores, types, normaliser spec)."""
    try:   # optional dependency (protobuf comes with the export extra)
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise UserError(f"reading {path} needs protobuf: {EXTRA}") from None
    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    return proto


def hf_tokenizer(sp_path: str):
    """A `tokenizers.Tokenizer` that encodes like the suite's SentencePiece model (see the module doc)."""
    try:   # optional dependency
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    except ImportError:
        raise UserError(f"--format hf needs the tokenizers package: {EXTRA}") from None
    proto = sentencepiece_proto(sp_path)
    normal = proto.SentencePiece.Type.NORMAL
    pieces = [(p.piece, p.score, p.type) for p in proto.pieces]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    is_normal = {piece for piece, _, kind in pieces if kind == normal}
    # SentencePiece BPE merges the pair whose result scores highest; as ranked merges that is
    # every split of a piece into two normal pieces, ordered by the piece's score.
    merges = sorted((-score, i, vocab[piece[:k]], (piece[:k], piece[k:]))
                    for i, (piece, score, kind) in enumerate(pieces) if kind == normal
                    for k in range(1, len(piece)) if piece[:k] in is_normal and piece[k:] in is_normal)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[m[-1] for m in merges], unk_token=pieces[UNK][0],
                               fuse_unk=True))
    spec = proto.normalizer_spec
    steps = [normalizers.Precompiled(spec.precompiled_charsmap)] if spec.precompiled_charsmap else []
    if spec.remove_extra_whitespaces:
        # A leading space is kept (one): it becomes the "▁" word prefix below, as SentencePiece's
        # dummy prefix would after stripping it.
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(" \\z"), "")]
    tok.normalizer = normalizers.Sequence(steps)
    prepend = "first" if spec.add_dummy_prefix else "never"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend, split=False)
    # Span markers are matched in the normalised text, like SentencePiece's user-defined symbols.
    # They are not "special": transformers' split_special_tokens (set in tokenizer_config.json) keeps
    # <s>, </s>, <pad> and <unk> written in a text as plain text, as SentencePiece does.
    tok.add_tokens([AddedToken(t, normalized=True, special=False) for t in SPECIAL_TOKENS])
    bos = pieces[BOS][0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, BOS)])
    return tok


def write_hf(sd: dict, arch: ThinkerArch, sp_path: str, out: str, dtype: str = "f32") -> list[str]:
    """A LlamaForCausalLM folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json
    (and the SentencePiece tokenizer.model for reference)."""
    tensors = llama_tensors(sd, arch)
    if dtype == "f16":
        tensors = {name: t.half() for name, t in tensors.items()}
    ffn_hidden = tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]
    names = {name: os.path.join(out, name) for name in
             ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")}
    tokenizer = hf_tokenizer(sp_path)
    os.makedirs(out, exist_ok=True)
    save_safetensors(tensors, names["model.safetensors"], {"format": "pt"})
    write_json(names["config.json"], hf_config(arch, ffn_hidden, dtype))
    tokenizer.save(names["tokenizer.json"])
    pieces = tokenizer.get_vocab()
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    inverse = {i: piece for piece, i in pieces.items()}
    write_json(names["tokenizer_config.json"], {
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": arch.max_seq_len,
        "clean_up_tokenization_spaces": False, "split_special_tokens": True,
        **{k: inverse[i] for k, i in special.items()}})
    shutil.copyfile(sp_path, names["tokenizer.model"])
    return list(names.values())


def save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict) -> None:
    """A safetensors file, written through Python so that a full disk is an OSError (safetensors'
    own writer reports it as a SafetensorError) and so one line (checkpoint.write_failure)."""
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)
    atomic_write(path, lambda f: f.write(data))


def interleave_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection from rotate-half pairs (i, i + d/2) to adjacent
    pairs (2i, 2i + 1) within each head: row 2i takes row i, row 2i + 1 takes row i + d/2."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def write_gguf(sd: dict, arch: ThinkerArch, sp_path: str, path: str, dtype: str = "f32") -> str:
    """A GGUF file of llama.cpp's "llama" architecture with the SentencePiece vocabulary."""
    try:   # optional dependency
        import gguf
    except ImportError:
        raise UserError(f"--format gguf needs the gguf package: {EXTRA}") from None
    tensors = llama_tensors(sd, arch)
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.LLAMA, arch.n_layers)
    head_dim = arch.d_model // arch.n_heads
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_name("omni-thinker")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(arch.vocab_size)
    writer.add_context_length(arch.max_seq_len)
    writer.add_embedding_length(arch.d_model)
    writer.add_block_count(arch.n_layers)
    writer.add_feed_forward_length(tensors["model.layers.0.mlp.gate_proj.weight"].shape[0])
    writer.add_head_count(arch.n_heads)
    writer.add_head_count_kv(arch.n_kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(arch.rope_theta)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    add_sentencepiece_vocab(writer, sp_path, arch.vocab_size)
    for name, t in tensors.items():
        if name.endswith("q_proj.weight"):
            t = interleave_rope_rows(t, arch.n_heads)
        elif name.endswith("k_proj.weight"):
            t = interleave_rope_rows(t, arch.n_kv_heads)
        # llama.cpp keeps 1-d tensors (norm weights) in f32 in an f16 file.
        array = t.numpy() if dtype == "f32" or t.dim() == 1 else t.half().numpy()
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), array)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_sentencepiece_vocab(writer, sp_path: str, vocab_size: int) -> None:
    """Pieces, scores and types of the SentencePiece model (its type numbers are GGUF's), padded
    with unused pieces up to the embedding's rows, and the special ids."""
    import gguf  # optional dependency (checked by write_gguf)
    pieces = list(sentencepiece_proto(sp_path).pieces)
    if len(pieces) > vocab_size:
        raise UserError(f"{sp_path}: {len(pieces)} pieces but the model has {vocab_size} embeddings")
    pad = range(len(pieces), vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([p.piece for p in pieces] + [f"[PAD{i}]" for i in pad])
    writer.add_token_scores([p.score for p in pieces] + [-1000.0] * len(pad))
    writer.add_token_types([int(p.type) for p in pieces] + [int(gguf.TokenType.UNUSED)] * len(pad))
    writer.add_bos_token_id(BOS)
    writer.add_eos_token_id(EOS)
    writer.add_unk_token_id(UNK)
    writer.add_pad_token_id(PAD)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(True)

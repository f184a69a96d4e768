"""The Thinker's attention, KV cache and generation."""
import torch

from conftest import record_cache_buffers
from omni.layers import Transformer, causal_attention_written_out
from omni.thinker import Thinker, ThinkerArch


def tiny_thinker(seed=0, **kw):
    torch.manual_seed(seed)
    arch = ThinkerArch(**{"vocab_size": 50, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2,
                          "max_seq_len": 64, **kw})
    return Thinker(arch).eval()


def test_greedy_generation_with_cache_equals_without_token_for_token():
    for n_kv in (4, 2, 1):
        model = tiny_thinker(n_kv_heads=n_kv)
        # Larger random weights: sharp, varied predictions instead of near-ties.
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.3)
        prompt = torch.tensor([[2, 7, 11, 5, 9]])
        cached = [t.item() for t in model.generate(prompt, max_new_tokens=30)]
        plain = [t.item() for t in model.generate(prompt, max_new_tokens=30, use_cache=False)]
        assert len(cached) == 30 and cached == plain, n_kv
        assert len(set(cached)) > 1


def test_static_cache_decodes_like_no_cache_and_is_allocated_once():
    model = tiny_thinker(5, max_seq_len=128)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    prompt = torch.tensor([[3, 8, 13, 21], [5, 6, 7, 8]])
    seen = record_cache_buffers(model.body)
    cached = torch.stack(list(model.generate(prompt, max_new_tokens=100)), 1)
    plain = torch.stack(list(model.generate(prompt, max_new_tokens=100, use_cache=False)), 1)
    assert cached.shape == (2, 100) and torch.equal(cached, plain)
    assert len(seen) == 100                          # one forward per new token, prompt included
    assert all(addresses == seen[0] for addresses in seen) and 0 not in seen[0]


def test_cached_logits_match_full_forward():
    model = tiny_thinker(1)
    ids = torch.randint(4, 50, (2, 12))
    full = model(ids)
    cache = model.new_cache()
    first = model(ids[:, :7], cache=cache)
    rest = model(ids[:, 7:], cache=cache)            # several queries after a filled cache
    assert torch.allclose(torch.cat([first, rest], 1), full, atol=1e-5)


def test_embeddings_and_ids_give_the_same_logits():
    model = tiny_thinker(2)
    ids = torch.randint(4, 50, (1, 9))
    assert torch.equal(model(ids), model(embeds=model.embed(ids)))


def test_generation_stops_at_eos_and_at_max_seq_len():
    model = tiny_thinker(3, max_seq_len=16)
    prompt = torch.tensor([[2, 7, 11]])
    first = next(model.generate(prompt)).item()
    out = list(model.generate(prompt, max_new_tokens=50, eos_id=first))
    assert [t.item() for t in out] == [first]
    assert len(list(model.generate(prompt, max_new_tokens=50))) == 16 - 3


def test_causal_attention_ignores_the_future_and_encoder_masks_padding():
    model = tiny_thinker(4)
    ids = torch.randint(4, 50, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = 3
    assert torch.allclose(model(ids)[0, :6], model(changed)[0, :6], atol=1e-6)
    torch.manual_seed(0)
    enc = Transformer(16, 1, 2, causal=False).eval()
    x = torch.randn(1, 6, 16)
    mask = torch.tensor([[True] * 4 + [False] * 2])
    noisy = x.clone()
    noisy[0, 4:] = 100.0
    assert torch.allclose(enc(x, mask)[0, :4], enc(noisy, mask)[0, :4], atol=1e-5)


def test_written_out_causal_attention_equals_sdpa_with_gradients():
    torch.manual_seed(6)
    q, k, v = (torch.randn(2, h, 10, 8, requires_grad=True) for h in (4, 2, 2))
    ours = causal_attention_written_out(q, k, v)
    ours.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    ref.sum().backward()
    assert torch.allclose(ours, ref, atol=1e-5)
    assert all(torch.allclose(g, t.grad, atol=1e-5) for g, t in zip(grads, (q, k, v)))

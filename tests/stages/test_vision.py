"""Stage C: the ViT, the caption encoder, InfoNCE, retrieval accuracy, loaders and a quick learning run."""
import json
import math
import os

import pytest
import torch

from conftest import load_pt, run_script, write_config
from omni.config import UserError
from omni.loading import load_clip, load_vision_encoder
from omni.metrics import (
    fit_linear_probe,
    parse_probe_groups,
    retrieval_accuracy,
    retrieval_hits,
    single_option,
    swap_probes,
)
from omni.vision import CLIP, CLS, LOG_SCALE_MAX, PAD, UNK, CaptionTokenizer, VisionArch, ViT, build_vocab, info_nce

WEIGHT_KEYS = ["vit", "img_proj", "text_proj", "text_embed"]


def vision_config(demo_dir, save_dir, **overrides) -> dict:
    """A tiny Stage C config on the tiny demo world (a run of 12 steps takes a few seconds)."""
    cfg = {"seed": 2, "save_dir": str(save_dir),
           "train_manifest": f"{demo_dir}/image_caption_train.jsonl",
           "val_manifest": f"{demo_dir}/image_caption_val.jsonl",
           "test_manifest": f"{demo_dir}/image_caption_test.jsonl",
           "patch_size": 16, "vit_dim": 32, "vit_layers": 1, "vit_heads": 2, "text_dim": 32, "text_layers": 1,
           "text_heads": 2, "embed_dim": 16, "dropout": 0.1, "max_shift": 3, "gallery_size": 10, "conv_stem": True,
           "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "max_steps": 12, "eval_interval": 4,
           "checkpoint_freq": 3, "keep_last_n": 10, "log_interval": 1, "eval_batches": 2, "progress": False}
    cfg.update(overrides)
    return cfg


def tiny_arch(**kw) -> VisionArch:
    base = dict(patch_size=16, vit_dim=32, vit_layers=1, vit_heads=2, text_dim=32, text_layers=1, text_heads=2,
                embed_dim=16, dropout=0.0, vocab=build_vocab(["a red circle above a blue square"]))
    return VisionArch(**{**base, **kw})


# ----------------------------------------------------------------------------- shapes
def test_vit_returns_cls_and_patch_tokens():
    vit = ViT(tiny_arch(patch_size=8))
    out = vit(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert out.shape == (2, 1 + 64, 32) and vit.out_dim == 32 and vit.num_tokens == 65


def test_conv_stem_keeps_the_token_grid():
    vit = ViT(tiny_arch(patch_size=8, conv_stem=True))
    assert vit(torch.rand(2, 3, 64, 64) * 2 - 1).shape == (2, 65, 32)
    with pytest.raises(ValueError, match="divisible by 8"):
        ViT(tiny_arch(patch_size=4, conv_stem=True))


def test_patch_size_must_divide_the_image():
    with pytest.raises(ValueError, match="multiple"):
        ViT(tiny_arch(patch_size=10))


def test_tokenizer_vocab_is_sorted_with_specials_first():
    vocab = build_vocab(["a red circle", "A blue square?"])
    assert vocab == ["a", "blue", "circle", "red", "square"]
    tok = CaptionTokenizer(vocab, max_words=4)
    assert tok.encode("a red star").tolist() == [CLS, 3, 6, UNK]
    assert tok.encode("a red circle a blue").tolist() == [CLS, 3, 6, 5]      # cut at max_words
    ids, mask = tok.batch(["a", "a red"])
    assert ids.tolist() == [[CLS, 3, PAD], [CLS, 3, 6]] and mask.tolist() == [[True, True, False], [True] * 3]


def test_caption_encoder_sees_word_order_and_ignores_padding():
    torch.manual_seed(0)
    model = CLIP(tiny_arch()).eval()
    a, b = model.encode_captions(["a red circle above a blue square", "a blue square above a red circle"])
    assert not torch.allclose(a, b, atol=1e-4)
    alone = model.encode_captions(["a red circle"])
    padded = model.encode_captions(["a red circle", "a red circle above a blue square"])[0]
    assert torch.allclose(alone[0], padded, atol=1e-5)


# ----------------------------------------------------------------------------- loss and metrics
def test_info_nce_is_symmetric_and_low_for_a_perfect_match():
    torch.manual_seed(0)
    logits = torch.randn(6, 6)
    assert info_nce(logits).item() == pytest.approx(info_nce(logits.T.contiguous()).item(), rel=1e-6)
    perfect = torch.eye(6) * 50
    assert info_nce(perfect).item() < 1e-6
    # duplicate captions: both are right answers, so the loss does not push them apart
    same = torch.eye(4, dtype=torch.bool)
    same[0, 1] = same[1, 0] = True
    tied = torch.eye(4) * 50
    tied[0, 1] = tied[1, 0] = 50
    assert info_nce(tied, same).item() < 1e-6 < info_nce(tied).item()


def test_temperature_is_learnable_and_clamped():
    torch.manual_seed(0)
    model = CLIP(tiny_arch())
    images, (ids, mask) = torch.rand(4, 3, 64, 64), model.tokenizer.batch(["a red circle"] * 2 + ["a blue square"] * 2)
    loss = info_nce(model.logits(images, ids, mask))
    loss.backward()
    assert model.text_embed.log_scale.grad is not None and model.text_embed.log_scale.grad.item() != 0
    with torch.no_grad():
        model.text_embed.log_scale.fill_(10.0)
    assert model.logit_scale().item() == pytest.approx(math.exp(LOG_SCALE_MAX))


def test_retrieval_accuracy_on_a_constructed_gallery():
    sim = torch.tensor([[0.9, 0.1, 0.0, 0.0],      # image 0 -> caption 0: right
                        [0.0, 0.2, 0.8, 0.0],      # image 1 -> caption 2: wrong
                        [0.0, 0.0, 0.7, 0.9],      # image 2 -> caption 3: a duplicate of caption 2, right
                        [0.0, 0.0, 0.1, 0.5]])     # image 3 -> caption 3: right
    same = torch.eye(4, dtype=torch.bool)
    same[2, 3] = same[3, 2] = True                 # captions 2 and 3 are the same words
    assert retrieval_hits(sim, same) == (3, 3)
    # caption->image: column argmax = images 0, 1, 1, 2 -> right, right, wrong, right
    i2t, t2i = retrieval_accuracy(sim, same)
    assert (i2t, t2i) == (0.75, 0.75)


# ----------------------------------------------------------------------------- loaders
@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory, demo_tiny):
    folder = tmp_path_factory.mktemp("vision")
    probes = ["shape=circle|square|triangle|star|diamond", "colour=red|green|blue|yellow|purple|orange"]
    cfg = vision_config(demo_tiny, folder / "run", max_steps=6, eval_interval=6, checkpoint_freq=6, decoder_layers=1,
                        probe_groups=probes, probe_images=6, hue_share=0.5, colour_words=["red", "blue"])
    run_script("train_vision.py", "--config", write_config(folder / "cfg.json", cfg), check=True)
    return str(folder / "run")


def _rewrite(src_dir, dst_dir, make):
    os.makedirs(dst_dir)
    torch.save(make(load_pt(os.path.join(src_dir, "vision_best.pt"))), os.path.join(dst_dir, "vision_best.pt"))
    with open(os.path.join(src_dir, "config.json")) as f, open(os.path.join(dst_dir, "config.json"), "w") as g:
        g.write(f.read())


def test_loaders_accept_full_weights_only_and_legacy(trained_dir, tmp_path):
    _rewrite(trained_dir, tmp_path / "weights",
             lambda o: {k: o[k] for k in WEIGHT_KEYS + ["step", "config", "format_version"]})
    _rewrite(trained_dir, tmp_path / "legacy", lambda o: {f"{k}.{n}": t for k in WEIGHT_KEYS for n, t in o[k].items()})
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    expected = None
    for folder in (trained_dir, tmp_path / "weights", tmp_path / "legacy"):
        vit = load_vision_encoder(str(folder), "cpu")
        assert isinstance(vit, ViT) and not vit.training and vit.out_dim == 32
        tokens = vit(images)
        assert tokens.shape == (2, 1 + 16, 32)
        assert expected is None or torch.equal(tokens, expected)
        expected = tokens
        clip = load_clip(str(folder), "cpu")
        assert clip.encode_captions(["a big red circle"]).shape == (1, 16)


def test_the_stems_batchnorm_statistics_are_trained_and_saved(trained_dir):
    """The running statistics are what the frozen ViT normalises with in Stage E and infer.py:
    they must move during training and travel in the `vit` weights."""
    vit = load_pt(os.path.join(trained_dir, "vision_best.pt"))["vit"]
    variances = [k for k in vit if k.startswith("patch.") and k.endswith("running_var")]
    assert len(variances) == 5     # one BatchNorm after each 3x3 convolution of the stem
    assert all(not torch.allclose(vit[k], torch.ones_like(vit[k])) for k in variances)


def test_hue_turns_need_the_colour_words_they_falsify(demo_tiny, tmp_path):
    cfg = vision_config(demo_tiny, tmp_path / "run", hue_share=0.5)
    proc = run_script("train_vision.py", "--config", write_config(tmp_path / "cfg.json", cfg))
    assert proc.returncode != 0 and "config key 'colour_words'" in proc.stderr.strip().splitlines()[-1]


def test_loader_without_checkpoint_says_how_to_train(tmp_path):
    with pytest.raises(UserError, match="train_vision.py"):
        load_vision_encoder(str(tmp_path), "cpu")


def test_vocab_and_metrics_are_stored(trained_dir, demo_tiny):
    with open(os.path.join(trained_dir, "config.json")) as f:
        vocab = json.load(f)["vocab"]
    with open(os.path.join(demo_tiny, "image_caption_train.jsonl")) as f:
        assert vocab == build_vocab(json.loads(line)["caption"] for line in f)
    assert load_pt(os.path.join(trained_dir, "vision.pt"))["config"]["vocab"] == vocab
    with open(os.path.join(trained_dir, "metrics.jsonl")) as f:
        val = [json.loads(line) for line in f if '"val"' in line][-1]
    for key in ("val_loss", "i2t_top1", "t2i_top1", "test_loss", "test_i2t_top1", "test_t2i_top1"):
        assert key in val and math.isfinite(val[key])


# ----------------------------------------------------------------------------- it learns
def test_retrieval_beats_chance_on_the_tiny_world(demo_tiny, tmp_path):
    """A short run of a tiny model: image->caption top-1 in galleries of 10 beats chance (10 %)."""
    cfg = vision_config(demo_tiny, tmp_path / "learn", dropout=0.0, batch_size=32, max_steps=120,
                        warmup_steps=10, eval_interval=120, checkpoint_freq=120, log_interval=10, eval_batches=0)
    run_script("train_vision.py", "--config", write_config(tmp_path / "cfg.json", cfg), check=True)
    with open(tmp_path / "learn" / "metrics.jsonl") as f:
        val = [json.loads(line) for line in f if '"val"' in line][-1]
    assert val["i2t_top1"] > 0.3, val


# ----------------------------------------------------------------------------- captioning and probes
def test_caption_decoder_is_causal_and_scores_whole_captions():
    torch.manual_seed(0)
    model = CLIP(tiny_arch(decoder_layers=1)).eval()
    assert "caption_decoder" in model.parts() and "caption_decoder" not in CLIP(tiny_arch()).parts()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    ids, mask = model.tokenizer.batch(["a red circle", "a red circle above a blue square"])
    tokens = model.vit(images)
    logits = model.caption_decoder(tokens, ids)
    assert logits.shape == (2, ids.shape[1], model.tokenizer.vocab_size)
    changed = ids.clone()
    changed[1, 3] = UNK                   # a later word cannot change what came before it
    assert torch.allclose(model.caption_decoder(tokens, changed)[1, :3], logits[1, :3], atol=1e-6)
    nll = model.caption_decoder.nll(tokens, ids, mask)
    # the short caption is scored on its 3 words and its end, never on the padding after it
    ids_short, mask_short = model.tokenizer.batch(["a red circle"])
    assert torch.allclose(nll[0], model.caption_decoder.nll(tokens[:1], ids_short, mask_short)[0], atol=1e-5)
    scores = model.caption_scores(images[0], ["a red circle", "a blue circle"])
    assert scores.shape == (2,) and torch.allclose(scores[0], -nll[0], atol=1e-5)


def test_captioning_learns_to_tell_one_shape_from_another():
    """A decoder that can see the image must learn what a shape-only probe asks; the loss of one
    batch falls and the probe of that batch goes right."""
    from PIL import Image, ImageDraw

    from omni.data.image import read_image

    def picture(shape, path):
        im = Image.new("RGB", (64, 64), (240, 240, 240))
        draw = ImageDraw.Draw(im)
        (draw.ellipse if shape == "circle" else draw.rectangle)((16, 16, 48, 48), fill=(200, 30, 30))
        im.save(path)
        return read_image(str(path), 64)

    import tempfile
    with tempfile.TemporaryDirectory() as d:
        images = torch.stack([picture(s, os.path.join(d, f"{s}.png")) for s in ("circle", "square")])
    captions = ["a red circle", "a red square"]
    torch.manual_seed(0)
    model = CLIP(tiny_arch(decoder_layers=1, vocab=build_vocab(captions + ["a red square"])))
    ids, mask = model.tokenizer.batch(captions)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    same = torch.eye(2, dtype=torch.bool)
    for _ in range(60):
        _, captioning = model.losses(images, ids, mask, same)
        opt.zero_grad()
        captioning.backward()
        opt.step()
    model.eval()
    groups = parse_probe_groups(["shape=circle|square"])
    for image, caption in zip(images, captions):
        [candidates] = swap_probes(caption.split(), groups["shape"])
        scores = model.caption_scores(image, [" ".join(c) for c in candidates])
        assert candidates[0] == caption.split() and scores[0] > scores[1]


def test_swap_probes_replace_one_occurrence_at_a_time():
    groups = parse_probe_groups(["colour=red|blue|green", "relation=above|left of|right of"])
    assert groups["relation"] == [["above"], ["left", "of"], ["right", "of"]]
    words = "a red circle left of a blue square".split()
    colour = swap_probes(words, groups["colour"])
    assert [c[0] for c in colour] == [words, words] and len(colour[0]) == 3
    assert colour[0][1:] == ["a blue circle left of a blue square".split(),
                             "a green circle left of a blue square".split()]
    assert colour[1][1] == "a red circle left of a red square".split()
    [relation] = swap_probes(words, groups["relation"])
    assert relation[1:] == ["a red circle above a blue square".split(), "a red circle right of a blue square".split()]
    assert swap_probes("a big star".split(), groups["colour"]) == []
    for bad in (["shape"], ["shape=circle"], ["=a|b"]):
        with pytest.raises(ValueError, match="probe_groups"):
            parse_probe_groups(bad)


def test_probes_are_reported_per_split(trained_dir):
    """The tiny run of trained_dir has probes on: val and test figures per group, in [0, 1]."""
    rows = [json.loads(line) for line in open(os.path.join(trained_dir, "metrics.jsonl"))]
    last = [r for r in rows if r.get("split") == "val"][-1]
    for name in ("probe_shape", "probe_colour", "test_probe_shape", "test_probe_colour",
                 "linear_shape", "linear_colour", "test_linear_shape", "test_linear_colour"):
        assert 0.0 <= last[name] <= 1.0, name


def test_single_option_labels_captions_that_name_one_member():
    groups = parse_probe_groups(["shape=circle|square|star", "relation=above|left of|right of"])
    assert single_option("a big red star".split(), groups["shape"]) == 2
    assert single_option("a red circle left of a blue square".split(), groups["shape"]) == -1   # two shapes
    assert single_option("a red circle left of a blue square".split(), groups["relation"]) == 1
    assert single_option("a red circle right of a blue circle".split(), groups["relation"]) == 2
    assert single_option("a big red thing".split(), groups["shape"]) == -1


def test_linear_probe_reads_an_attribute_only_where_the_features_hold_it():
    """Labels carried by two of eight feature dimensions are read on new samples; labels the features
    do not carry stay near chance; the same data give the same probe."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (200,), generator=gen)
    codes = torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, -2.0]])
    features = torch.cat([codes[labels], torch.zeros(200, 6)], dim=1) + 0.5 * torch.randn(200, 8, generator=gen)
    predict = fit_linear_probe(features[:100], labels[:100], classes=3)
    assert (predict(features[100:]) == labels[100:]).float().mean() > 0.95
    assert torch.equal(fit_linear_probe(features[:100], labels[:100], classes=3)(features), predict(features))
    unrelated = torch.randint(0, 3, (200,), generator=gen)
    guess = fit_linear_probe(features[:100], unrelated[:100], classes=3)(features[100:])
    assert (guess == unrelated[100:]).float().mean() < 0.55

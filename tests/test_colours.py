"""Shape and colour kept apart: recolouring for stages C and E (omni/data/recolour.py), silhouettes
and patch colours for Stage E (omni/colours.py)."""
import torch
from PIL import Image

from omni.colours import (COLOUR_SCALE, CROP, DESCRIPTOR, object_masks, object_tokens, patch_colours, silhouette,
                          silhouette_crops)
from omni.data.recolour import OFF_PALETTE, PALETTE, drop_repainted, recolour
from omni.data.image import ImageCaptionDataset
from omni.data.world import COLOURS

BACKGROUND = (238, 238, 238)


def scene(first="red", second="blue", size=64) -> torch.Tensor:
    """[3, size, size] in [-1, 1]: a `first` block over pixels 8-23 of both axes, a `second` block
    at the bottom right, on a light grey background, flat colours as the demo world draws them."""
    rgb = torch.tensor(BACKGROUND, dtype=torch.float)[:, None, None].repeat(1, size, size)
    rgb[:, 8:24, 8:24] = torch.tensor(COLOURS[first], dtype=torch.float)[:, None, None]
    rgb[:, 40:56, 44:60] = torch.tensor(COLOURS[second], dtype=torch.float)[:, None, None]
    return rgb / 127.5 - 1.0


def to_rgb(img):
    return ((img + 1) * 127.5).round()


def test_recolouring_repaints_whole_objects_off_palette_and_names_them():
    img = scene()
    out, removed = recolour(img, torch.Generator().manual_seed(0), share=1.0)
    assert sorted(removed) == ["blue", "red"]
    assert removed == sorted(removed, key=lambda name: COLOURS[name])   # drawn for in (r, g, b) order
    rgb = to_rgb(out)
    for region in (rgb[:, 8:24, 8:24], rgb[:, 40:56, 44:60]):
        colours = region.reshape(3, -1).T.unique(dim=0)
        assert len(colours) == 1                                  # still one flat colour per object
        assert (PALETTE - colours[0]).norm(dim=1).min() >= OFF_PALETTE
        assert (colours[0] - torch.tensor(BACKGROUND)).norm() >= OFF_PALETTE
    assert torch.equal(silhouette(out[None]), silhouette(img[None]))   # shapes and places untouched

    same, none = recolour(img, torch.Generator().manual_seed(0), share=0.0)
    assert torch.equal(same, img) and none == []
    # about half the objects at share 0.5, decided per object by the generator
    picks = [len(recolour(img, torch.Generator().manual_seed(s), 0.5)[1]) for s in range(40)]
    assert 20 < sum(picks) < 60 and min(picks) == 0 and max(picks) == 2


def test_silhouette_keeps_the_background_and_hides_the_colour():
    red_blue, green_yellow = silhouette(scene("red", "blue")[None]), silhouette(scene("green", "yellow")[None])
    assert torch.equal(red_blue, green_yellow)
    assert torch.equal(to_rgb(red_blue[0, :, 0, 0]), torch.tensor(BACKGROUND, dtype=torch.float))
    assert len(to_rgb(red_blue).reshape(3, -1).T.unique(dim=0)) == 2     # the background and one grey


def test_patch_colours_follow_the_vits_patch_order_after_a_blank_cls():
    img = scene()                                    # red in patch (row 1, col 1) of an 8 x 8 grid of 8 px
    colours = patch_colours(img[None], num_tokens=1 + 64)
    assert colours.shape == (1, 65, 3) and torch.equal(colours[0, 0], torch.zeros(3))
    red = torch.tensor(COLOURS["red"], dtype=torch.float) / 127.5 - 1.0
    assert torch.allclose(colours[0, 1 + 1 * 8 + 1], red * COLOUR_SCALE, atol=1e-5)
    assert colours[0, 1 + 6 * 8 + 6, 2] > colours[0, 1 + 6 * 8 + 6, 0]       # blue at the bottom right


def test_objects_are_the_connected_foreground_regions_largest_first():
    img = scene()
    rgb = to_rgb(img)
    rgb[:, 40:56, 4:20] = torch.tensor(COLOURS["green"], dtype=torch.float)[:, None, None]   # a third, 16 x 16
    rgb[:, 30:33, 30:32] = torch.tensor(COLOURS["green"], dtype=torch.float)[:, None, None]  # 6 px: an object
    rgb[:, 60, 2] = torch.tensor(COLOURS["red"], dtype=torch.float)                        # 1 px: noise
    # a diagonal tail: 8-connected to the red block, so part of it
    for k in range(4):
        rgb[:, 24 + k, 24 + k] = torch.tensor(COLOURS["red"], dtype=torch.float)
    masks = object_masks(torch.stack([rgb / 127.5 - 1.0, img]))
    assert [m.sum((1, 2)).tolist() for m in masks] == [[16 * 16 + 4, 16 * 16, 16 * 16, 6], [256, 256]]
    assert masks[0][0, 8:24, 8:24].all() and masks[0][0, 27, 27]                # the red block and its tail
    assert not masks[0][:, 60, 2].any()
    blank = torch.full((1, 3, 64, 64), 0.5)
    assert object_masks(blank)[0].shape == (0, 64, 64)


def test_object_tokens_pool_the_patches_each_object_covers_with_its_colour_and_place():
    img = scene()                                # red over pixels 8-23 (patches (1,1),(1,2),(2,1),(2,2) of 8 px)
    feats = torch.randn(1, 65, 5)
    (tokens, descriptors), = object_tokens(img[None], feats)
    assert tokens.shape == (3, 5) and descriptors.shape == (3, DESCRIPTOR)
    assert torch.equal(tokens[0], feats[0, 0]) and torch.equal(descriptors[0], torch.zeros(DESCRIPTOR))
    red_patches = [1 + r * 8 + c for r in (1, 2) for c in (1, 2)]
    assert torch.allclose(tokens[1], feats[0, red_patches].mean(0), atol=1e-5)   # both 16 x 16: red first
    red = torch.tensor(COLOURS["red"], dtype=torch.float) / 127.5 - 1.0
    assert torch.allclose(descriptors[1, :3], red * COLOUR_SCALE, atol=1e-5)
    centre = (15.5 / 63) * 2 - 1                                                # pixel 15.5 of 0..63
    assert torch.allclose(descriptors[1, 3:5], torch.tensor([centre, centre]), atol=1e-5)
    assert torch.allclose(descriptors[1, 5], torch.tensor(2 * (256 / 4096) ** 0.5))
    assert (descriptors[1, 6:] > -0.5).all()                                    # a square fills its outline
    assert descriptors[2, 3] > 0.5 and descriptors[2, 4] > 0.5                  # blue at the bottom right
    # the ViT's features reach an object's token only through the patches it covers
    feats2 = feats.clone()
    feats2[0, 1 + 7 * 8 + 0] += 100                                            # a background patch
    assert torch.equal(object_tokens(img[None], feats2)[0][0], tokens)


def test_silhouette_crops_read_an_outline_alike_at_any_size_and_place():
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    masks = torch.zeros(4, 64, 64)
    masks[0, 4:20, 40:56] = 1                          # a 16 x 16 square, top right
    masks[1, 20:52, 10:42] = 1                         # a 32 x 32 square elsewhere
    for r in range(32):                                # a triangle: apex up, 32 rows
        masks[2, 20 + r, 26 - r // 2:26 + r // 2 + 1] = 1
    masks[3, 30:34, 5:45] = 1                          # a flat bar: 4 x 40, kept flat in a square crop
    crops = silhouette_crops(masks, xs, ys)
    assert crops.shape == (4, CROP * CROP) and crops.min() >= -1 and crops.max() <= 1
    assert (crops[0] - crops[1]).abs().max() < 0.3     # the same outline at two sizes and places
    assert (crops[0] > -0.5).all()                       # a square fills its crop
    triangle = crops[2].reshape(CROP, CROP)
    assert triangle[:CROP // 2].mean() < triangle[CROP // 2:].mean() - 0.5   # narrow at the top, wide below
    bar = crops[3].reshape(CROP, CROP)
    assert bar[0].max() < -0.9 and bar[-1].max() < -0.9 and bar[:, 1:-1].mean(1).max() > -0.5   # flat, in the middle
    assert silhouette_crops(torch.zeros(0, 64, 64), xs, ys).shape == (0, CROP * CROP)


def test_the_caption_dataset_drops_the_colour_words_of_repainted_objects(tmp_path):
    path = tmp_path / "a.png"
    Image.fromarray(to_rgb(scene()).permute(1, 2, 0).byte().numpy()).save(path)
    records = [{"image": str(path), "caption": "a big red square above a big blue square", "_source": "line 1"}]
    train = ImageCaptionDataset(records, image_size=64, recolour_share=1.0, augment=True)
    sample = train[(0, 0)]
    assert sample["caption"] == "a big square above a big square"
    assert not any(torch.equal(to_rgb(sample["image"])[:, 12, 14], torch.tensor(c, dtype=torch.float))
                   for c in COLOURS.values())
    assert torch.equal(train[(0, 0)]["image"], sample["image"])        # seeded by (seed, epoch, index)
    plain = ImageCaptionDataset(records, image_size=64, recolour_share=1.0, augment=False)[(0, 0)]
    assert plain["caption"] == records[0]["caption"]                   # evaluation data stays as it is


def turns(*pairs):
    return [t for q, a in pairs for t in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]


def test_only_the_turns_still_true_after_repainting_are_kept():
    conversation = turns(("what colour is the circle?", "red"), ("what shape is the red one?", "circle"),
                         ("is there a red square?", "no"), ("is the circle big or small?", "big"),
                         ("describe the picture", "a big red circle above a small blue square"),
                         ("what colour is the square?", "blue"))
    assert drop_repainted(conversation, ["red"]) == turns(
        ("is the circle big or small?", "big"), ("describe the picture", "a big circle above a small blue square"),
        ("what colour is the square?", "blue"))
    assert drop_repainted(conversation, []) == conversation


def test_sft_training_images_are_repainted_with_their_conversation(tmp_path):
    from omni.data.sft import SFTDataset
    path = tmp_path / "a.png"
    Image.fromarray(to_rgb(scene()).permute(1, 2, 0).byte().numpy()).save(path)
    colours = turns(("what colour is the circle?", "red"), ("what colour is the square?", "blue"))
    records = [{"image": str(path), "_source": "line 1", "conversation": colours + turns(("how many?", "two"))},
               {"image": str(path), "_source": "line 2", "conversation": colours}]
    original = SFTDataset(records)[(0, 0)]["image"]
    repainted, untouched = (SFTDataset(records, recolour_share=1.0, augment=True)[(i, 0)] for i in (0, 1))
    assert repainted["conversation"] == turns(("how many?", "two"))
    assert not torch.equal(repainted["image"], original)
    assert torch.equal(silhouette(repainted["image"][None]), silhouette(original[None]))
    # nothing left to ask: the sample stays as it was rather than train on an empty conversation
    assert untouched["conversation"] == colours and torch.equal(untouched["image"], original)
    # validation data (no augmentation) is never repainted
    assert SFTDataset(records, recolour_share=1.0)[(0, 0)]["conversation"] == records[0]["conversation"]

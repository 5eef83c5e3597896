"""Raw images + captions through the model's own preprocessing (``ecif_fast.data``), on tiny randomly initialised
Hugging Face and open_clip CLIP models; the tokenizer and image processor are built in code (nothing is
downloaded)."""
from __future__ import annotations

import json
import string

import numpy as np
import pytest
import torch
from PIL import Image

import ecif_fast as ef
from ecif_fast import ECIFInputError
from ecif_fast.data import CaptionedImages, encode_pairs, pair_collate

from transformers import (CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTextConfig, CLIPTokenizer,
                          CLIPVisionConfig)

IMG = 8
CAPTIONS = ["a cat", "the dog sat on a mat", "dog", "a cat and a dog", "cat", "the cat sat",
            "a dog ran", "cats"]  # different lengths: batches are padded to different lengths


def rgb(seed, h=13, w=17):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """8 images of every accepted kind: PNG paths, PIL (RGB and grayscale), uint8 arrays, a (3, H, W) tensor."""
    folder = tmp_path_factory.mktemp("imgs")
    paths = []
    for i in range(3):
        p = folder / f"img{i}.png"
        Image.fromarray(rgb(i, 20 + i, 11)).save(p)
        paths.append(str(p))
    gray = Image.fromarray(rgb(5)[:, :, 0])                                   # mode "L"
    return [paths[0], Image.fromarray(rgb(3)), rgb(4), gray, torch.from_numpy(rgb(6)).permute(2, 0, 1),
            paths[1], rgb(7, 9, 30)[:, :, :1], folder / "img2.png"]


# ------------------------------------------------------------------------------------------ dataset
def test_captioned_images_loads_every_kind_as_rgb(images, tmp_path):
    ds = CaptionedImages(images, CAPTIONS)
    assert len(ds) == 8
    for i in range(8):
        im, cap = ds[i]
        assert isinstance(im, Image.Image) and im.mode == "RGB" and cap == CAPTIONS[i]
    assert np.array_equal(np.asarray(ds[2][0]), images[2])
    assert np.array_equal(np.asarray(ds[4][0]), rgb(6))                       # (3, H, W) tensor
    assert np.array_equal(np.asarray(ds[0][0]), rgb(0, 20, 11))               # PNG is lossless
    g = np.asarray(ds[3][0])
    assert np.array_equal(g[:, :, 0], g[:, :, 2]) and np.array_equal(g[:, :, 0], rgb(5)[:, :, 0])
    # paths load lazily: the file may appear after the dataset is made
    late = tmp_path / "late.png"
    lazy = CaptionedImages([late], ["later"])
    Image.fromarray(rgb(9)).save(late)
    assert np.array_equal(np.asarray(lazy[0][0]), rgb(9))


def test_captioned_images_bad_input(tmp_path):
    with pytest.raises(ECIFInputError, match="mismatched lengths: 2 images but 1 captions; pass one caption per"):
        CaptionedImages([rgb(0), rgb(1)], ["x"])
    with pytest.raises(ECIFInputError, match="no image-caption pairs: pass at least one"):
        CaptionedImages([], [])
    with pytest.raises(ECIFInputError, match="not a single string"):
        CaptionedImages([rgb(0)], "x")
    with pytest.raises(ECIFInputError, match="caption 1 is a int, not a string"):
        CaptionedImages([rgb(0), rgb(1)], ["x", 3])
    with pytest.raises(ECIFInputError, match="image 0: no such image file"):
        CaptionedImages([tmp_path / "missing.png"], ["x"])[0]
    with pytest.raises(ECIFInputError, match="must be uint8"):
        CaptionedImages([np.zeros((4, 4, 3))], ["x"])[0]
    with pytest.raises(ECIFInputError, match=r"got shape \(4, 4, 2\)"):
        CaptionedImages([np.zeros((4, 4, 2), np.uint8)], ["x"])[0]


# ------------------------------------------------------------------------------------------ Hugging Face
TOKENS = ["<|startoftext|>", "<|endoftext|>"] + list(string.ascii_lowercase) + \
         [c + "</w>" for c in string.ascii_lowercase] + ["ca", "cat</w>", "do", "dog</w>", "th", "the</w>"]
MERGES = ["c a", "ca t</w>", "d o", "do g</w>", "t h", "th e</w>"]
BOS, EOS = 0, 1


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A real CLIPTokenizer (byte-pair encoding) over a tiny vocabulary written to disk."""
    folder = tmp_path_factory.mktemp("tok")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(TOKENS)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, EOS)  # CLIP pads with EOS
    return tok


@pytest.fixture(scope="module")
def image_processor():
    return CLIPImageProcessor(size={"shortest_edge": IMG}, crop_size={"height": IMG, "width": IMG})


def hf_clip(seed=0):
    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=len(TOKENS), hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=24, eos_token_id=EOS, bos_token_id=BOS,
                          pad_token_id=EOS, projection_dim=4)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMG, patch_size=4, num_channels=3, projection_dim=4)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=4)
    return ef.wrap(CLIPModel._from_config(cfg, attn_implementation="sdpa").double().eval())


def test_hf_collate_equals_the_processor_by_hand(images, tokenizer, image_processor):
    model = hf_clip()
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    batch = [CaptionedImages(images, CAPTIONS)[i] for i in range(8)]
    pils = [im for im, _ in batch]
    px, ids = pair_collate(model, processor=processor)(batch)
    by_hand = processor(images=pils, text=CAPTIONS, padding=True, return_tensors="pt")
    assert px.dtype == torch.float64 and px.shape == (8, 3, IMG, IMG)
    assert torch.equal(px, by_hand["pixel_values"].double())
    assert torch.equal(ids, by_hand["input_ids"])
    assert ids.shape[1] == max(len(tokenizer(c)["input_ids"]) for c in CAPTIONS)  # the longest caption
    # the two parts given separately, and an explicit dtype
    px2, ids2 = pair_collate(model, image_transform=image_processor, tokenizer=tokenizer, dtype=torch.float32)(batch)
    assert px2.dtype == torch.float32 and torch.equal(px2, by_hand["pixel_values"]) and torch.equal(ids2, ids)
    # plain callables: a per-image transform and a tokenizer that pads itself
    def transform(im):
        return torch.from_numpy(np.array(im.resize((IMG, IMG)))).permute(2, 0, 1) / 255.0

    def tok(captions):
        return tokenizer(captions, padding="max_length", max_length=20)["input_ids"]

    collate = pair_collate(model, image_transform=transform, tokenizer=tok)
    px3, ids3 = collate(batch)
    assert torch.equal(px3, torch.stack([transform(im) for im in pils]).double())
    assert torch.equal(ids3, torch.tensor(tok(CAPTIONS))) and collate.pad_token_id is None


def test_hf_needs_preprocessing(tokenizer):
    model = hf_clip()
    with pytest.raises(ECIFInputError, match=r"no image_transform and no tokenizer for CLIPModel; .*processor="
                                             r"CLIPProcessor.from_pretrained"):
        pair_collate(model)
    with pytest.raises(ECIFInputError, match="no image_transform for CLIPModel"):
        pair_collate(model, tokenizer=tokenizer)
    with pytest.raises(ECIFInputError, match="non-empty list of .image, caption. pairs"):
        pair_collate(model, tokenizer=tokenizer, image_transform=lambda im: im)([rgb(0)])
    tokenizer.padding_side = "left"
    try:
        with pytest.raises(ECIFInputError, match="needs right padding"):
            pair_collate(model, tokenizer=tokenizer, image_transform=lambda im: im)
    finally:
        tokenizer.padding_side = "right"


def test_hf_right_padding_does_not_change_text_features(tokenizer):
    """CLIP's causal text tower pools at EOS: padding after it (to any length) leaves the feature unchanged."""
    model = hf_clip()
    alone = tokenizer(["a cat"], return_tensors="pt")["input_ids"]            # (1, 4): BOS a cat EOS
    with torch.no_grad():
        ref = model.encode_text(alone)
        for extra in (1, 5, 17):
            padded = torch.nn.functional.pad(alone, (0, extra), value=tokenizer.pad_token_id)
            assert torch.allclose(model.encode_text(padded), ref, rtol=0, atol=1e-13)
        # in a batch with a longer caption (padded by the tokenizer to that caption's length)
        batch = tokenizer(["the dog sat on a mat", "a cat"], padding="longest", return_tensors="pt")["input_ids"]
        assert batch.shape[1] > alone.shape[1]
        assert torch.allclose(model.encode_text(batch)[1:], ref, rtol=0, atol=1e-13)
        # the claim is about the causal mask, not the pad id: any tokens after EOS are ignored
        junk = torch.cat([alone, torch.tensor([[5, 40, 2]])], 1)
        assert torch.allclose(model.encode_text(junk), ref, rtol=0, atol=1e-13)


def test_hf_fit_from_a_loader_equals_fit_from_tensors(images, tokenizer, image_processor):
    model = hf_clip()
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    X, Y = encode_pairs(model, images, CAPTIONS, batch_size=3, processor=processor)
    # encode_pairs pads each batch's captions to the longest of all batches
    X1, Y1 = pair_collate(model, processor=processor)(list(CaptionedImages(images, CAPTIONS)))
    assert torch.equal(X, X1) and torch.equal(Y, Y1)

    loader = torch.utils.data.DataLoader(CaptionedImages(images, CAPTIONS), batch_size=3, shuffle=False,
                                         collate_fn=pair_collate(model, processor=processor))
    assert len({b[1].shape[1] for b in loader}) > 1                           # batches padded to different lengths
    kw = dict(damping=1e3, batches=4, params="heads", solver="exact")
    by_loader = ef.ECIF(model, **kw).fit(loader)
    by_tensors = ef.ECIF(model, **kw).fit(X, Y)
    assert by_loader.source.streamed                      # the loader is read again, not held
    assert torch.equal(by_loader.X, X) and torch.equal(by_loader.Y, Y)       # gathered on request, padded alike
    assert torch.equal(by_loader.U, by_tensors.U) and torch.equal(by_loader.V, by_tensors.V)
    Xt, Yt = X[:3], Y[:3]
    # each batch is encoded at its own padded length (padding does not change a feature, to rounding)
    got, want = by_loader.influence(Xt, Yt).total, by_tensors.influence(Xt, Yt).total
    print("loader vs tensors (captions padded per batch):", float((got - want).abs().max()))
    torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12 * float(want.abs().max()))
    # the features of each pair do not depend on how its caption was padded
    with torch.no_grad():
        for i, c in enumerate(CAPTIONS):
            v = model.encode_text(tokenizer([c], return_tensors="pt")["input_ids"])
            assert torch.allclose(by_loader.V[i], v[0], rtol=0, atol=1e-13)


def test_real_photographs(image_processor, tokenizer):
    """Real photographs of different sizes (scikit-image ships them) through the processor."""
    import skimage.data as skdata
    photos = [skdata.astronaut(), skdata.coffee(), skdata.camera()]         # 512², 400×600, grayscale 512²
    px, ids = encode_pairs(hf_clip(), photos, ["an astronaut", "a cup of coffee", "a man with a camera"],
                           batch_size=2, image_transform=image_processor, tokenizer=tokenizer)
    by_hand = image_processor(images=[Image.fromarray(p).convert("RGB") for p in photos], return_tensors="pt")
    assert torch.equal(px, by_hand["pixel_values"].double()) and ids.shape[0] == 3


# ------------------------------------------------------------------------------------------ open_clip
import open_clip  # noqa: E402  (a dev dependency: missing, these tests fail rather than skip)
CONTEXT = 16


def tiny_open_clip(context=CONTEXT):
    torch.manual_seed(0)
    # SimpleTokenizer's ids go up to 49407: the text vocabulary must have that size (width kept tiny)
    return open_clip.model.CLIP(embed_dim=4, vision_cfg={"width": 8, "layers": 1, "head_width": 4, "image_size": IMG,
                                                         "patch_size": 4},
                                text_cfg={"width": 8, "layers": 1, "heads": 2, "context_length": context,
                                          "vocab_size": 49408}).double().eval()


def open_clip_model(clip):
    model = ef.wrap(clip)
    assert type(model).__name__ == "OpenCLIP" and model.clip is clip
    return model


def test_open_clip_collate_uses_the_models_own_preprocessing(images):
    clip = tiny_open_clip()
    batch = list(CaptionedImages(images, CAPTIONS))
    collate = pair_collate(open_clip_model(clip))
    px, ids = collate(batch)
    transform = open_clip.image_transform(IMG, is_train=False)                # what create_model_and_transforms gives
    assert px.dtype == torch.float64
    assert torch.equal(px, torch.stack([transform(im) for im, _ in batch]).double())
    assert torch.equal(ids, open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)(CAPTIONS))
    assert ids.shape == (8, CONTEXT) and collate.pad_token_id == 0
    # a preprocessing config set by open_clip.create_model (visual.preprocess_cfg) is followed
    open_clip.set_model_preprocess_cfg(clip, {"size": IMG, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                                              "interpolation": "bilinear", "resize_mode": "squash"})
    px2, _ = pair_collate(clip)(batch)
    custom = open_clip.image_transform(IMG, is_train=False, mean=(0.5,) * 3, std=(0.25,) * 3,
                                       interpolation="bilinear", resize_mode="squash")
    assert torch.equal(px2, torch.stack([custom(im) for im, _ in batch]).double()) and not torch.equal(px2, px)


def test_open_clip_small_vocabulary_needs_a_tokenizer():
    clip = open_clip.model.CLIP(embed_dim=4, vision_cfg={"width": 8, "layers": 1, "head_width": 4, "image_size": IMG,
                                                         "patch_size": 4},
                                text_cfg={"width": 8, "layers": 1, "heads": 2, "context_length": 6, "vocab_size": 50})
    with pytest.raises(ECIFInputError, match="vocabulary has 50 tokens .* pass the model's own tokenizer="):
        pair_collate(clip)
    own = pair_collate(clip, tokenizer=lambda captions: torch.ones(len(captions), 6, dtype=torch.long))
    assert own.pad_token_id is None                                          # the default transform, the given tokenizer


def test_open_clip_right_padding_does_not_change_text_features():
    """EOT pooling under the causal mask: tokens after EOT are ignored, and a model with a shorter context (same
    weights, positional embedding cut) gives the same feature for the caption padded to that shorter length."""
    clip = tiny_open_clip()
    ids = open_clip.tokenizer.SimpleTokenizer(context_length=CONTEXT)(["a photo of a dog"])
    eot = int(ids[0].argmax())
    assert eot < 8
    with torch.no_grad():
        ref = clip.encode_text(ids)
        junk = ids.clone()
        junk[0, eot + 1:] = torch.randint(1, 49000, (CONTEXT - eot - 1,), generator=torch.Generator().manual_seed(0))
        assert torch.allclose(clip.encode_text(junk), ref, rtol=0, atol=1e-13)
        short = tiny_open_clip(context=8)
        state = clip.state_dict()
        state["positional_embedding"] = state["positional_embedding"][:8]
        short.load_state_dict(state)
        assert torch.allclose(short.encode_text(ids[:, :8]), ref, rtol=0, atol=1e-13)


def test_open_clip_fit_from_a_loader_equals_fit_from_tensors(images):
    model = open_clip_model(tiny_open_clip())
    X, Y = encode_pairs(model, images, CAPTIONS, batch_size=3)
    loader = torch.utils.data.DataLoader(CaptionedImages(images, CAPTIONS), batch_size=3, shuffle=False,
                                         collate_fn=pair_collate(model))
    kw = dict(damping=1e3, batches=4, params="heads", solver="exact")
    by_loader = ef.ECIF(model, **kw).fit(loader)
    by_tensors = ef.ECIF(model, **kw).fit(X, Y)
    assert torch.equal(by_loader.X, X) and torch.equal(by_loader.Y, Y) and Y.shape == (8, CONTEXT)
    assert torch.equal(by_loader.U, by_tensors.U) and torch.equal(by_loader.V, by_tensors.V)
    assert torch.equal(by_loader.influence(X[:3], Y[:3]).total, by_tensors.influence(X[:3], Y[:3]).total)

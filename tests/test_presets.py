"""Named parameter presets (``params="heads"``, ``"last:K"``, ``"lora"``, ``"all"``, ``"trainable"``) on tiny,
randomly initialised Hugging Face and open_clip CLIP models (nothing is downloaded), with and without peft."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import ecif_fast as ef
from ecif_fast import ECIFInputError, oracle
from ecif_fast.models.params import select_params
from ecif_fast.data import pair_collate
from ecif_fast.models import families
from ecif_fast.models.families.base import Adapter, Family, Tower
from ecif_fast.models.presets import Preset, last_blocks, preset

from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

VOCAB, SEQ, IMG, EOS = 40, 5, 8, 39


def tiny_clip(seed=0, width=8, layers=2):
    """The tiny config of test_hf_clip.py with 2 blocks per tower (so "last:1" is not everything)."""
    torch.manual_seed(seed)
    text = CLIPTextConfig(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=2, max_position_embeddings=SEQ, eos_token_id=EOS, bos_token_id=0,
                          pad_token_id=1, projection_dim=4)
    vision = CLIPVisionConfig(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                              num_attention_heads=2, image_size=IMG, patch_size=4, num_channels=3, projection_dim=4)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=4)
    return CLIPModel._from_config(cfg, attn_implementation="sdpa").double().eval()


def lora(clip, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(clip, LoraConfig(r=2, target_modules=list(targets), init_lora_weights=False)).double()


def under(names, prefixes):
    """Names equal to or under one of the dotted ``prefixes``."""
    return {n for n in names if any(n == q or n.startswith(q + ".") for q in prefixes)}


def names_of(model):
    return [n for n, _ in model.named_parameters()]


# ------------------------------------------------------------------------------------------ Hugging Face
HF_HEADS = ["visual_projection", "text_projection"]
HF_LAST1 = ["vision_model.encoder.layers.1", "vision_model.post_layernorm", "visual_projection",
            "text_model.encoder.layers.1", "text_model.final_layer_norm", "text_projection"]


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "peft"])
def test_hf_presets_select_the_expected_names(peft):
    clip = lora(tiny_clip()) if peft else tiny_clip()
    model = ef.wrap(clip)
    root = "clip.base_model.model." if peft else "clip."
    names = names_of(model)

    heads = select_params(model, "heads").names
    assert set(heads) == {root + "visual_projection.weight", root + "text_projection.weight"}
    last1 = set(select_params(model, "last:1").names)
    assert last1 == under(names, [root + p for p in HF_LAST1])
    assert not any(".layers.0." in n or "embeddings" in n or "logit_scale" in n for n in last1)
    assert (peft and any("lora_" in n for n in last1)) or not peft  # LoRA weights of the last block too
    assert set(select_params(model, last_blocks(1)).names) == last1
    assert set(select_params(model, "last:2").names) == \
        {n for n in names if "embeddings" not in n and "pre_layrnorm" not in n and "logit_scale" not in n}
    everything = select_params(model, "all").names
    assert everything == tuple(names) and root + "logit_scale" in everything
    assert select_params(model, "trainable").names == select_params(model).names
    if peft:
        lora_names = select_params(model, "lora").names
        assert lora_names == select_params(model).names  # peft trains exactly its LoRA weights
        assert len(lora_names) == 2 * 2 * 2 * 2 and all("lora_" in n for n in lora_names)  # A,B × q,v × 2 × towers
    else:
        with pytest.raises(ECIFInputError, match="wrap the model with peft first"):
            select_params(model, "lora")


def test_presets_on_the_raw_model_and_in_lists():
    clip = tiny_clip()
    assert set(select_params(clip, "heads").names) == {"visual_projection.weight", "text_projection.weight"}
    assert set(select_params(clip, "last:1").names) == under(names_of(clip), HF_LAST1)
    # names and presets mix in a list: the union, in the model's order
    model = ef.wrap(clip)
    both = select_params(model, ["heads", "clip.logit_scale"]).names
    assert set(both) == {"clip.logit_scale", "clip.visual_projection.weight", "clip.text_projection.weight"}
    assert list(both) == [n for n in names_of(model) if n in both]


def test_all_includes_frozen_and_skips_non_float():
    model = ef.wrap(tiny_clip())
    model.clip.requires_grad_(False)
    model.clip.visual_projection.requires_grad_(True)
    assert select_params(model, "trainable").names == ("clip.visual_projection.weight",)
    assert len(select_params(model, "all").names) == len(names_of(model))
    model.counter = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    assert "counter" not in select_params(model, "all").names


def test_bad_k_names_the_depth():
    model = ef.wrap(tiny_clip())
    with pytest.raises(ECIFInputError, match=r"the vision tower has 2 transformer blocks, fewer than K = 3"):
        select_params(model, "last:3")
    for bad in ("last:0", "last:x", "last:-1", "last:"):
        with pytest.raises(ECIFInputError, match=r'K in "last:K" must be an integer >= 1'):
            select_params(model, bad)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ECIFInputError, match=r"last_blocks\(k\) needs an integer k >= 1"):
            last_blocks(bad)
    with pytest.raises(ECIFInputError, match="unknown parameter preset 'head'"):
        preset("head")


class Custom(nn.Module):
    """Not a CLIP: one module is literally called ``heads``."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(3, 3)
        self.heads = nn.Linear(3, 2)


def test_unknown_architecture_and_name_precedence():
    model = Custom()
    for p in ("last:1", preset("heads")):
        with pytest.raises(ECIFInputError, match="no CLIP architecture .* found in Custom; pass parameter names"):
            select_params(model, p)
    # a parameter or module literally named like a preset is selected by name, as before presets existed
    assert select_params(model, "heads").names == ("heads.weight", "heads.bias")
    assert select_params(model, "all").names == ("backbone.weight", "backbone.bias", "heads.weight", "heads.bias")
    with pytest.raises(ECIFInputError, match=r"match no parameter of Custom; available: .*; presets: heads, last:K"):
        select_params(model, "nothing")
    # two CLIP models in one module: ambiguous
    pair = nn.ModuleDict({"a": tiny_clip(), "b": tiny_clip()})
    with pytest.raises(ECIFInputError, match="holds 2 CLIP models"):
        select_params(pair, "heads")
    assert isinstance(preset("last:2"), Preset) and str(preset("last:2")) == "last:2"


# ------------------------------------------------------------------------------------------ end to end
def pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    px = torch.randn(n, 3, IMG, IMG, generator=g, dtype=torch.float64)
    ids = torch.randint(2, EOS, (n, SEQ), generator=g)
    ids[:, 0], ids[:, -1] = 0, EOS
    return px, ids


def assert_matches_oracle(ecif, model, px, ids, tpx, tids, damping):
    """ECIF's influence on the test loss equals the brute-force oracle's (same ``params="last:1"``) to 1e-8."""
    res = ecif.influence(tpx, tids)

    def F(mm):
        return ef.contrastive_loss(mm.encode_image(tpx), mm.encode_text(tids), mm.logit_scale.exp())

    gF = torch.func.grad(lambda th: ecif.fm.call(th, F))(ecif.theta)
    total, positive = oracle.brute_force_influence(model, px, ids, gF, batches=4, params="last:1", damping=damping)
    assert float((res.total - total).abs().max() / total.abs().max()) < 1e-8
    assert float((res.positive - positive).abs().max() / positive.abs().max()) < 1e-8


def test_last_block_influence_equals_the_oracle():
    """``params="last:1"`` through ECIF and through the brute-force oracle (same argument) agree to 1e-8."""
    model = ef.wrap(tiny_clip(width=4))
    px, ids = pairs(8)
    tpx, tids = pairs(3, seed=1)
    damping = 5e4
    ecif = ef.ECIF(model, damping=damping, batches=4, params="last:1", solver="exact", curvature="hessian").fit(px, ids)
    assert set(ecif.space.names) == under(names_of(model), ["clip." + p for p in HF_LAST1])
    assert_matches_oracle(ecif, model, px, ids, tpx, tids, damping)


# ------------------------------------------------------------------------------------------ open_clip
import open_clip  # noqa: E402  (a dev dependency: missing, these tests fail rather than skip)

OC_LAST1 = ["visual.transformer.resblocks.1", "visual.ln_post", "visual.proj",
            "transformer.resblocks.1", "ln_final", "text_projection"]


def tiny_open_clip(width=8, mlp_ratio=4.0, **text):
    torch.manual_seed(0)
    return open_clip.model.CLIP(embed_dim=4, vision_cfg={"width": width, "layers": 2, "head_width": width // 2,
                                                         "image_size": 8, "patch_size": 4, "mlp_ratio": mlp_ratio},
                                text_cfg={"width": width, "layers": 2, "heads": 2, "context_length": 6,
                                          "vocab_size": 50, "mlp_ratio": mlp_ratio, **text}).double()


def open_clip_adapter(clip):
    model = ef.wrap(clip)
    assert type(model).__name__ == "OpenCLIP" and model.clip is clip
    return model


@pytest.mark.parametrize("peft", [False, True], ids=["plain", "peft"])
def test_open_clip_presets_select_the_expected_names(peft):
    clip = tiny_open_clip()
    if peft:
        clip = lora(clip, targets=["c_fc"])
    model = open_clip_adapter(clip)
    root = "clip.base_model.model." if peft else "clip."
    names = names_of(model)
    assert set(select_params(model, "heads").names) == {root + "visual.proj", root + "text_projection"}
    last1 = set(select_params(model, "last:1").names)
    assert last1 == under(names, [root + p for p in OC_LAST1])
    assert set(select_params(clip, "last:1").names) == {n[len("clip."):] for n in last1}  # the raw model
    assert not any("resblocks.0." in n for n in last1)
    assert set(select_params(model, "all").names) == set(names)
    with pytest.raises(ECIFInputError, match="the vision tower has 2 transformer blocks, fewer than K = 5"):
        select_params(model, "last:5")
    if peft:
        assert set(select_params(model, "lora").names) == {n for n in names if "lora_" in n} != set()


def test_open_clip_linear_text_projection_and_custom_text():
    """``proj_type="linear"`` makes text_projection a module; CustomTextCLIP keeps its text tower in ``.text``."""
    model = open_clip_adapter(tiny_open_clip(proj_type="linear", proj_bias=True))
    heads = set(select_params(model, "heads").names)
    assert heads == {"clip.visual.proj", "clip.text_projection.weight", "clip.text_projection.bias"}

    torch.manual_seed(0)
    custom = open_clip.model.CustomTextCLIP(
        embed_dim=4, vision_cfg={"width": 8, "layers": 2, "head_width": 4, "image_size": 8, "patch_size": 4},
        text_cfg={"width": 8, "layers": 3, "heads": 2, "context_length": 6, "vocab_size": 50}).double()
    model = open_clip_adapter(custom)
    assert set(select_params(model, "heads").names) == {"clip.visual.proj", "clip.text.text_projection"}
    assert set(select_params(model, "last:2").names) == under(names_of(model), [
        "clip.visual.transformer.resblocks.0", "clip.visual.transformer.resblocks.1", "clip.visual.ln_post",
        "clip.visual.proj", "clip.text.transformer.resblocks.1", "clip.text.transformer.resblocks.2",
        "clip.text.ln_final", "clip.text.text_projection"])
    with pytest.raises(ECIFInputError, match="the vision tower has 2 transformer blocks, fewer than K = 3"):
        select_params(model, "last:3")


def test_open_clip_last_block_influence_equals_the_oracle():
    model = open_clip_adapter(tiny_open_clip(width=4, mlp_ratio=1.0))
    g = torch.Generator().manual_seed(0)
    px = torch.randn(11, 3, 8, 8, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 49, (11, 6), generator=g)
    ids[:, 4], ids[:, 5] = 49, 0                                  # EOT (the largest id: argmax pooling), padding
    (px, tpx), (ids, tids) = px.split([8, 3]), ids.split([8, 3])
    damping = 5e4
    ecif = ef.ECIF(model, damping=damping, batches=4, params="last:1", solver="exact", curvature="hessian").fit(px, ids)
    assert set(ecif.space.names) == under(names_of(model), ["clip." + p for p in OC_LAST1])
    assert_matches_oracle(ecif, model, px, ids, tpx, tids, damping)


# ------------------------------------------------------------------------------------------ a new family
class ToyCLIP(nn.Module):
    """A dual encoder of another "library": linear blocks per tower and two projections."""

    def __init__(self):
        super().__init__()
        self.towers = nn.ModuleDict({t: nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 3)) for t in ("image", "text")})
        self.proj_image, self.proj_text = nn.Linear(3, 2), nn.Linear(3, 2)
        self.logit_scale = nn.Parameter(torch.tensor(1.0))


class ToyAdapter(Adapter):
    def encode_image(self, x):
        return self.clip.proj_image(self.clip.towers["image"](x))

    def encode_text(self, y):
        return self.clip.proj_text(self.clip.towers["text"](y))


class ToyFamily(Family):
    name, label, library = "toy", "ToyCLIP", __name__.split(".")[0]

    def matches(self, model):
        return isinstance(model, ToyCLIP)

    def wrap(self, model):
        return ToyAdapter(model)

    def towers(self, module):
        if not isinstance(module, ToyCLIP):
            return None
        return [Tower(t, module.towers[t], [], getattr(module, "proj_" + t)) for t in ("image", "text")]

    def fill_preprocessing(self, clip, image_transform, tokenizer):
        return image_transform or (lambda im: torch.zeros(3, 2, 2)), tokenizer or (lambda c: [[1, 2]] * len(c))


def test_a_new_family_is_one_registry_entry(monkeypatch):
    """wrap, the presets and pair_collate dispatch through ``FAMILIES``: registering a family is enough."""
    toy = ToyCLIP()
    monkeypatch.setattr(families, "FAMILIES", families.FAMILIES + (ToyFamily(),))
    model = ef.wrap(toy)
    assert isinstance(model, ToyAdapter) and model.clip is toy and model.logit_scale is toy.logit_scale
    assert select_params(model, "heads").names == ("clip.proj_image.weight", "clip.proj_image.bias",
                                                   "clip.proj_text.weight", "clip.proj_text.bias")
    assert set(select_params(model, "last:1").names) == under(names_of(model), [
        "clip.towers.image.1", "clip.towers.text.1", "clip.proj_image", "clip.proj_text"])
    px, ids = pair_collate(model)([(torch.zeros(4, 4, 3, dtype=torch.uint8), "a caption")] * 2)
    assert px.shape == (2, 3, 2, 2) and ids.tolist() == [[1, 2], [1, 2]]
    monkeypatch.undo()
    with pytest.raises(ECIFInputError, match=r"no CLIP architecture \(Hugging Face CLIPModel or open_clip CLIP\)"):
        select_params(toy, "heads")

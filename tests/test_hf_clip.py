"""ECIF on a real Hugging Face CLIP architecture: a tiny, randomly initialised ``transformers.CLIPModel``
in float64 (nothing is downloaded), through ``ecif_fast.wrap``, against the brute-force autograd oracle
(``g_k = ∇R − ∇R_{−k}`` through the whole model, dense Hessian by double backward)."""
from __future__ import annotations

import pytest
import torch

import ecif_fast as ef
from ecif_fast import oracle
from problems import assert_cleaned_copy_updates_only_lora
from tiny_hf_clip import pairs, tiny_clip


def test_wrap_gives_clips_own_normalised_features():
    clip = tiny_clip()
    model = ef.wrap(clip)
    px, ids = pairs(3)
    with torch.no_grad():
        u = clip.get_image_features(pixel_values=px)
        u = u if torch.is_tensor(u) else u.pooler_output
        v = clip.get_text_features(input_ids=ids)
        v = v if torch.is_tensor(v) else v.pooler_output
        assert torch.allclose(model.encode_image(px), u / u.norm(dim=-1, keepdim=True), atol=1e-14)
        assert torch.allclose(model.encode_text(ids), v / v.norm(dim=-1, keepdim=True), atol=1e-14)
    assert model.logit_scale is clip.logit_scale
    assert ef.wrap(model) is model
    with pytest.raises(ef.ECIFInputError, match="custom dual encoder"):
        ef.wrap(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("params, damping", [
    (["clip.visual_projection", "clip.text_projection"], 5e3),     # heads only
    (None, 5e6),                                                    # every parameter of both towers
], ids=["heads", "all"])
@pytest.mark.parametrize("batches", [4, None], ids=["batch", "all-negatives"])
def test_influence_equals_the_brute_force_oracle(params, damping, batches):
    """Untrained model: the damping makes H positive definite; the identity I = ∇Fᵀ H⁻¹ g_k holds at any θ."""
    model = ef.wrap(tiny_clip())
    px, ids = pairs(12)
    tpx, tids = pairs(4, seed=1)
    ecif = ef.ECIF(model, damping=damping, batches=batches, params=params, solver="exact", curvature="hessian").fit(px, ids)
    res = ecif.influence(tpx, tids)

    def F(mm):
        return ef.contrastive_loss(mm.encode_image(tpx), mm.encode_text(tids), mm.logit_scale.exp())

    gF = torch.func.grad(lambda th: ecif.fm.call(th, F))(ecif.theta)
    total, positive = oracle.brute_force_influence(model, px, ids, gF, batches=batches, params=params,
                                                   damping=damping)
    scale = total.abs().max()
    assert float((res.total - total).abs().max() / scale) < 1e-8
    assert float((res.positive - positive).abs().max() / positive.abs().max()) < 1e-8


def lora_clip(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # init_lora_weights=False: random B as well as A (a fresh LoRA has B = 0, so ∇F vanishes on A)
    return get_peft_model(tiny_clip(seed), LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False)).double()


def test_lora_influence_and_cleaned_copy():
    """peft LoRA: the default selection is the trained LoRA weights; influence equals the oracle, and the
    cleaned model is a copy whose LoRA weights (only) carry the removal update."""
    clip = lora_clip()
    model = ef.wrap(clip)
    ecif = ef.ECIF(model, damping=5e3, batches=4, solver="exact", curvature="hessian")
    assert ecif.space.names and all("lora_" in n for n in ecif.space.names)
    px, ids = pairs(12)
    tpx, tids = pairs(4, seed=1)
    ecif.fit(px, ids)
    res = ecif.influence(tpx, tids)

    def F(mm):
        return ef.contrastive_loss(mm.encode_image(tpx), mm.encode_text(tids), mm.logit_scale.exp())

    gF = torch.func.grad(lambda th: ecif.fm.call(th, F))(ecif.theta)
    total, _ = oracle.brute_force_influence(model, px, ids, gF, batches=4, damping=5e3)
    assert float((res.total - total).abs().max() / total.abs().max()) < 1e-8

    assert_cleaned_copy_updates_only_lora(ecif, model, [0, 5])

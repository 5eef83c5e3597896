"""ECIF on a real open_clip architecture: a tiny, randomly initialised ``open_clip.model.CLIP`` in float64
(nothing is downloaded), through ``ecif_fast.wrap``, against the brute-force autograd oracle
(``g_k = ∇R − ∇R_{−k}`` through the whole model; ``H⁻¹∇F`` with the dense Hessian by double backward, or,
for all ~2,100 parameters, by CG on double-backward Hessian-vector products). The towers use
``nn.MultiheadAttention`` in eval mode, so the adapter's switch-off of the MHA fast path and of the fused
SDPA kernels is exercised by every JVP pass and every exact Hessian here (without it the JVP pass fails:
neither ``_native_multi_head_attention`` nor the CPU flash kernel has forward-mode AD)."""
from __future__ import annotations

import pytest
import torch

import ecif_fast as ef
from ecif_fast import oracle
from ecif_fast.models.functional import FunctionalModel
from ecif_fast.models.families.open_clip import OpenCLIP
from ecif_fast.models.params import select_params
from problems import IMG, SEQ, VOCAB, assert_cleaned_copy_updates_only_lora, token_pairs as pairs

import open_clip  # noqa: E402  (a dev dependency: missing, these tests fail rather than skip)

N = 8
VISION = dict(layers=1, width=8, head_width=4, mlp_ratio=2.0, patch_size=4, image_size=IMG)       # 2 heads
TEXT = dict(context_length=SEQ, vocab_size=VOCAB, width=8, heads=2, layers=1, mlp_ratio=2.0)


def tiny_clip(seed=0, **kwargs):
    torch.manual_seed(seed)
    return open_clip.model.CLIP(embed_dim=4, vision_cfg=VISION, text_cfg=TEXT, **kwargs).double().eval()


def val_loss(tpx, tids):
    def F(mm):
        return ef.contrastive_loss(mm.encode_image(tpx), mm.encode_text(tids), mm.logit_scale.exp())
    return F


def solve_by_hvp_cg(model, px, ids, b, *, batches, params, damping, tol=1e-14):
    """``(C + δI)⁻¹ b`` by plain CG on Hessian-vector products by double backward (reverse over reverse,
    no vmap): the oracle's ``H⁻¹∇F`` without its dense Hessian, which takes P backward passes (slow for
    the ~2,100 parameters of the whole tiny model) and is used where P is small."""
    space = select_params(model, params)
    fm = FunctionalModel(model, space)
    theta = space.flat(model).requires_grad_(True)
    U, V, s = fm.embed(theta, px, ids)
    grad = torch.autograd.grad(ef.contrastive_loss(U, V, s.exp(), batches), theta, create_graph=True)[0]

    def apply(v):
        return torch.autograd.grad(grad, theta, v, retain_graph=True)[0] + damping * v

    x, r = torch.zeros_like(b), b.clone()
    d, rs = r.clone(), r @ r
    for _ in range(2 * b.numel()):
        if rs.sqrt() <= tol * b.norm():
            break
        Ad = apply(d)
        alpha = rs / (d @ Ad)
        x, r = x + alpha * d, r - alpha * Ad
        rs, rs_old = r @ r, rs
        d = r + (rs / rs_old) * d
    assert rs.sqrt() <= tol * b.norm()
    return x.detach()


def assert_matches_oracle(ecif, model, px, ids, *, batches, params, damping, dense_hessian=True):
    """Every pair's total and positive influence on a validation loss against the brute-force oracle."""
    tpx, tids = pairs(4, seed=1)
    res = ecif.influence(tpx, tids)
    gF = torch.func.grad(lambda th: ecif.fm.call(th, val_loss(tpx, tids)))(ecif.theta)
    if dense_hessian:
        total, pos = oracle.brute_force_influence(model, px, ids, gF, batches=batches, params=params,
                                                  damping=damping)
    else:  # the same oracle formula G H⁻¹ ∇F, H⁻¹∇F solved matrix-free
        G, Gp = oracle.brute_force_pair_gradients(model, px, ids, batches=batches, params=params)
        h = solve_by_hvp_cg(model, px, ids, gF, batches=batches, params=params, damping=damping)
        total, pos = G @ h, Gp @ h
    assert float((res.total - total).abs().max() / total.abs().max()) < 1e-8
    assert float((res.positive - pos).abs().max() / pos.abs().max()) < 1e-8


def test_wrap_gives_open_clips_own_normalised_features():
    clip = tiny_clip()
    model = ef.wrap(clip)
    assert isinstance(model, OpenCLIP) and model.clip is clip
    px, ids = pairs(3)
    with torch.no_grad():  # open_clip's own path (fused kernels) against the adapter's
        u, v = clip.encode_image(px), clip.encode_text(ids)
        assert torch.allclose(model.encode_image(px), clip.encode_image(px, normalize=True), rtol=0, atol=1e-14)
        assert torch.allclose(model.encode_image(px), u / u.norm(dim=-1, keepdim=True), rtol=0, atol=1e-14)
        assert torch.allclose(model.encode_text(ids), v / v.norm(dim=-1, keepdim=True), rtol=0, atol=1e-14)
    assert model.logit_scale is clip.logit_scale
    assert ef.wrap(model) is model
    assert torch.backends.mha.get_fastpath_enabled()  # the process-wide flag is restored after each call
    names = {n for n, _ in model.named_parameters()}
    assert {"clip.visual.proj", "clip.text_projection", "clip.logit_scale"} <= names


def test_siglip_logit_bias_is_refused():
    with pytest.raises(ef.ECIFInputError, match="logit_bias"):
        ef.wrap(tiny_clip(init_logit_bias=-10.0))


def test_custom_text_clip_is_wrapped():
    torch.manual_seed(0)
    clip = open_clip.model.CustomTextCLIP(embed_dim=4, vision_cfg=VISION, text_cfg=TEXT).double().eval()
    model = ef.wrap(clip)
    px, ids = pairs(3)
    with torch.no_grad():
        assert torch.allclose(model.encode_text(ids), clip.encode_text(ids, normalize=True), rtol=0, atol=1e-14)
        assert torch.allclose(model.encode_image(px), clip.encode_image(px, normalize=True), rtol=0, atol=1e-14)
    assert model.logit_scale is clip.logit_scale


# Dampings: about 4x the most negative eigenvalue of the undamped Hessian on these N pairs (heads −6.1e3,
# all −4.2e4, LoRA −1.1e3, with "all" negatives; batches of 4 are alike or milder), so H is positive definite
# while the curvature still carries a good part of H (its largest eigenvalues are of the same order).
@pytest.mark.parametrize("params, damping", [
    (["clip.visual.proj", "clip.text_projection"], 2.5e4),   # heads only
    (None, 1.5e5),                                          # every parameter of both towers (and logit_scale)
], ids=["heads", "all"])
@pytest.mark.parametrize("batches", [4, None], ids=["batch", "all-negatives"])
def test_influence_equals_the_brute_force_oracle(params, damping, batches):
    """Untrained model: the damping makes H positive definite; the identity I = ∇Fᵀ H⁻¹ g_k holds at any θ."""
    model = ef.wrap(tiny_clip())
    px, ids = pairs(N)
    ecif = ef.ECIF(model, damping=damping, batches=batches, params=params, solver="exact", curvature="hessian").fit(px, ids)
    assert_matches_oracle(ecif, model, px, ids, batches=batches, params=params, damping=damping,
                          dense_hessian=params is not None)


@pytest.mark.parametrize("nonscalar", [False, True], ids=["scalar", "shape-1"])
def test_trained_logit_scale(nonscalar):
    """open_clip's logit_scale, 0-d or of shape (1,) (``nonscalar_logit_scale``), selected with the heads."""
    model = ef.wrap(tiny_clip(nonscalar_logit_scale=nonscalar))
    px, ids = pairs(N)
    params = ["clip.visual.proj", "clip.text_projection", "clip.logit_scale"]
    ecif = ef.ECIF(model, damping=2.5e4, batches=4, params=params, solver="exact", curvature="hessian").fit(px, ids)
    assert ecif.fm.scale_trained
    assert_matches_oracle(ecif, model, px, ids, batches=4, params=params, damping=2.5e4)


@pytest.mark.parametrize("batches", [4, None], ids=["batch", "all-negatives"])
def test_custom_attention_blocks(batches):
    """open_clip's own ``Attention`` (``block_type="custom"``, F.scaled_dot_product_attention): the ln_1
    weights sit before the attention, so every tangent and the exact Hessian pass through it."""
    torch.manual_seed(0)
    clip = open_clip.model.CLIP(embed_dim=4, vision_cfg=dict(VISION, block_type="custom"),
                                text_cfg=dict(TEXT, block_type="custom")).double().eval()
    model = ef.wrap(clip)
    px, ids = pairs(N)
    params = ["clip.visual.transformer.resblocks.0.ln_1", "clip.transformer.resblocks.0.ln_1"]
    ecif = ef.ECIF(model, damping=1.5e3, batches=batches, params=params, solver="exact", curvature="hessian").fit(px, ids)
    assert_matches_oracle(ecif, model, px, ids, batches=batches, params=params, damping=1.5e3)  # λmin −357


def lora_clip(seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    # c_fc / c_proj: the MLP Linears of every block of both towers. Not the MHA's out_proj: nn.MultiheadAttention
    # reads out_proj.weight directly and never calls out_proj, so a LoRA there would have no effect.
    # init_lora_weights=False: random B as well as A (a fresh LoRA has B = 0, so ∇F vanishes on A).
    return get_peft_model(tiny_clip(seed), LoraConfig(r=2, target_modules=["c_fc", "c_proj"],
                                                      init_lora_weights=False)).double()


def test_lora_on_multihead_attention_is_reported():
    from peft import LoraConfig, get_peft_model

    with pytest.warns(UserWarning, match="out_proj .* has no effect"):
        ef.wrap(get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["out_proj", "c_fc"])))
    with pytest.raises(ef.ECIFInputError, match="merges its weights through .data"):
        ef.wrap(get_peft_model(tiny_clip(), LoraConfig(r=2, target_modules=["attn"])))


@pytest.mark.parametrize("batches", [4, None], ids=["batch", "all-negatives"])
def test_lora_influence_equals_the_brute_force_oracle(batches):
    """peft LoRA: the default selection is the trained LoRA weights (of both towers)."""
    model = ef.wrap(lora_clip())
    assert isinstance(model, OpenCLIP)
    ecif = ef.ECIF(model, damping=5e3, batches=batches, solver="exact", curvature="hessian")
    names = ecif.space.names
    assert names and all("lora_" in n for n in names)
    assert any(".visual." in n for n in names) and any(".visual." not in n for n in names)
    px, ids = pairs(N)
    ecif.fit(px, ids)
    assert_matches_oracle(ecif, model, px, ids, batches=batches, params=None, damping=5e3)


def test_lora_cleaned_copy_changes_only_lora_weights():
    model = ef.wrap(lora_clip())
    px, ids = pairs(N)
    ecif = ef.ECIF(model, damping=5e3, batches=4, solver="exact", curvature="hessian").fit(px, ids)
    assert_cleaned_copy_updates_only_lora(ecif, model, [0, 5])


@pytest.mark.parametrize("batches", [4, None], ids=["batch", "all-negatives"])
def test_matrix_free_cg_matches_the_exact_solver(batches):
    """Gauss–Newton products through the real towers (matrix-free CG) against the dense Gauss–Newton
    matrix of the exact solver, every parameter."""
    model = ef.wrap(tiny_clip())
    px, ids = pairs(N)
    tpx, tids = pairs(4, seed=1)
    common = dict(damping=1e3, batches=batches, curvature="gauss-newton")
    exact = ef.ECIF(model, solver="exact", **common).fit(px, ids).influence(tpx, tids)
    cg = ef.ECIF(model, solver="cg", cg_tol=1e-12, **common).fit(px, ids).influence(tpx, tids)
    for a, b in ((cg.total, exact.total), (cg.positive, exact.positive), (cg.negative, exact.negative)):
        assert float((a - b).abs().max() / b.abs().max()) < 1e-6

"""Ground truth (SPEC §6.1) on a LoRA fine-tuning: ECIF vs leave-one-out retraining of a ``peft`` LoRA on a
tiny Hugging Face CLIP, float64, nothing downloaded.

Setup (all seeds fixed):
- Base model: a tiny randomly initialised ``transformers.CLIPModel`` (hidden 8, 1 layer per tower, projection 8,
  logit scale fixed at 5), "pre-trained" on domain A in about a second: 150 Adam steps over all its weights on
  128 pairs of 8 latent classes (an image is its class's 3×8×8 prototype plus noise; a caption is BOS, 4 tokens
  drawn from its class's 4 tokens, EOS). It then matches classes across modalities, so the contrastive loss is in
  a sensible regime and a misaligned caption means something. (Straight from the random init, fine-tuning only
  memorised the training pairs and raised the validation loss.)
- Fine-tuning: LoRA r = 2 on ``q_proj``, ``v_proj``, ``visual_projection``, ``text_projection`` (P = 192) with
  peft's *standard* init (random A, B = 0), so fine-tuning starts at the pre-trained model, and θ_ref = that init:
  R is the fine-tuning loss plus weight decay towards the starting point, as LoRA is used. (test_hf_clip needs
  ``init_lora_weights=False`` because it takes influences at the untrained model, where B = 0 makes ∇F vanish on
  A; here they are taken at θ̂, where B ≠ 0.) n = 32 pairs of a shifted domain B (new image prototypes,
  correlated with A's); fixed batches of 8 that each hold every class once; pairs 0 and 9 carry another class's
  caption. F = the SPEC §2 contrastive loss of 16 held-out domain-B pairs as one batch (the ``F`` of
  ``ECIF.influence(val_images, val_texts)``); fine-tuning lowers it from 59.11 to 51.58.
- Optimum: ``ecif_fast.train`` (L-BFGS, then Newton) to max|∇R| < 1e-9 (reached: ~1e-13), and every
  leave-one-out model likewise, warm-started from θ̂, same batches with the pair deleted (SPEC §3).

Damping δ = 300. The damped Hessian at θ̂ has eigenvalues 159.4 … 1729.1 (the loss Hessian alone is indefinite,
−140.6 … 1429.1): R is strongly convex around θ̂ while the loss curvature dominates the top directions. Measured
over all 32 pairs (batches of 8): Pearson(ECIF total, actual ΔF) = 0.945, Spearman 0.962 (Taylor negative term:
Pearson 0.903). Both misaligned pairs are predicted and measured harmful (ECIF −0.17, −0.17: the 6th and 5th most
harmful of 32; actual −0.11, −0.08). Removal update of the top-3 pairs by |influence| vs retraining without them:
cosine of the parameter changes 0.960 (norm ratio 0.89); with "all" negatives 0.928 (0.83).
Choosing δ (same file, other δ): δ = 100 gives λ_min 35.8, λ_max 7978 and Pearson 0.875 (one Newton step
under-shoots the removals); δ = 30 reaches no optimum (max|∇R| = 3.2 after L-BFGS and 5 Newton steps); δ = 1000
gives 0.996 but the damping is then at least half of every eigenvalue (808 … 2097) and fine-tuning barely moves
F (59.11 -> 56.43).

The test can fail: the negative role dropped (positive part only, classical IF) gives Pearson 0.838, the negative
role with the wrong sign 0.606; both are asserted to be clearly below the exact ECIF.

"All" negatives (one batch of 32) is checked here for the Hessian and the removal update only: its leave-one-out
run (another ~15 s) does not fit the file's time budget. Measured once over all 32 pairs: Pearson 0.960, Spearman
0.922, positive-only 0.903, wrong sign 0.782, Taylor 0.958; there the misaligned pairs are predicted mildly
harmful (−0.12, −0.05) but removing them raised F (+0.30, +0.12).
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import pytest
import torch
from scipy.stats import spearmanr

import ecif_fast as ef
from ecif_fast.training import train
from problems import pearson

pytest.importorskip("peft")
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig  # noqa: E402

VOCAB, SEQ, IMG, EOS = 40, 6, 8, 39
CLASSES, N_TRAIN, N_VAL, BATCH, DAMPING = 8, 32, 16, 8, 300.0
MISALIGNED = (0, 9)
RANK, TARGETS, P = 2, ("q_proj", "v_proj", "visual_projection", "text_projection"), 192


def _tiny_clip():
    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=SEQ, eos_token_id=EOS, bos_token_id=0,
                          pad_token_id=1, projection_dim=8)
    vision = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                              image_size=IMG, patch_size=4, num_channels=3, projection_dim=8)
    cfg = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)
    clip = CLIPModel._from_config(cfg, attn_implementation="sdpa").double().eval()
    with torch.no_grad():
        clip.logit_scale.fill_(math.log(5.0))
    return clip


def _prototypes():
    g = torch.Generator().manual_seed(123)
    a = torch.randn(CLASSES, 3, IMG, IMG, generator=g, dtype=torch.float64)
    b = (a + 0.7 * torch.randn(CLASSES, 3, IMG, IMG, generator=g, dtype=torch.float64)) / math.sqrt(1.49)
    return a, b  # domain A (pre-training), domain B (fine-tuning, validation)


def _pairs(n, seed, prototypes, misaligned=()):
    """Every consecutive block of 8 pairs holds each class once; ``misaligned`` get another class's caption."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.cat([torch.randperm(CLASSES, generator=g) for _ in range(-(-n // CLASSES))])[:n]
    px = prototypes[cls] + 0.5 * torch.randn(n, 3, IMG, IMG, generator=g, dtype=torch.float64)
    caption = cls.clone()
    bad = torch.tensor(misaligned, dtype=torch.long)
    caption[bad] = (cls[bad] + 1 + torch.randint(0, CLASSES - 1, (len(bad),), generator=g)) % CLASSES
    per = (EOS - 2) // CLASSES
    ids = 2 + caption[:, None] * per + torch.randint(0, per, (n, SEQ), generator=g)
    ids[:, 0], ids[:, -1] = 0, EOS
    return px, ids


@functools.lru_cache(maxsize=1)
def _pretrained_clip():
    clip = _tiny_clip()
    model = ef.wrap(clip)
    X, Y = _pairs(128, 7, _prototypes()[0])
    opt = torch.optim.Adam([p for p in clip.parameters() if p is not clip.logit_scale], lr=1e-2)
    for _ in range(150):
        loss = ef.contrastive_loss(model.encode_image(X), model.encode_text(Y), 5.0, 32)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return clip.requires_grad_(False)


@dataclass
class Problem:
    model: torch.nn.Module      # wrap(peft LoRA model) at θ̂
    ref: torch.Tensor           # θ_ref: the LoRA init
    batches: int | None
    X: torch.Tensor
    Y: torch.Tensor
    Xv: torch.Tensor
    Yv: torch.Tensor
    ecif: ef.ECIF

    def F(self, m) -> float:
        with torch.no_grad():
            return float(ef.contrastive_loss(m.encode_image(self.Xv), m.encode_text(self.Yv), m.logit_scale.exp()))

    def converge(self, model, keep=None):
        """``ecif_fast.train`` to the optimum of R (of R_{−D*} for the pairs not in ``keep``, same batches):
        L-BFGS gets close, Newton finishes (L-BFGS alone stalls at max|∇R| ~ 1e-7…1e-6, where R's decrease is
        below float64 resolution)."""
        keep = torch.ones(N_TRAIN, dtype=torch.bool) if keep is None else keep
        ids = ef.resolve_batches(self.batches, N_TRAIN).batch_ids()[keep]
        kw = dict(batches=ids, damping=DAMPING, theta_ref=self.ref)
        train(model, self.X[keep], self.Y[keep], method="lbfgs", max_iter=500, **kw)
        fit = train(model, self.X[keep], self.Y[keep], method="newton", max_iter=5, **kw)
        assert fit.grad_norm < 1e-9, fit
        return model

    def retrained_without(self, removed):
        keep = torch.ones(N_TRAIN, dtype=torch.bool)
        keep[list(removed)] = False
        return self.converge(copy.deepcopy(self.model), keep)


@functools.lru_cache(maxsize=None)
def _problem(batches) -> Problem:
    """The LoRA fine-tuned to θ̂ with these training batches, and ECIF fitted there."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(_pretrained_clip())
    torch.manual_seed(0)  # the LoRA A init
    model = ef.wrap(get_peft_model(base, LoraConfig(r=RANK, target_modules=list(TARGETS))).double())
    space = ef.ECIF(model, damping=DAMPING).space
    assert space.size == P and all("lora_" in n for n in space.names)
    domain_b = _prototypes()[1]
    X, Y = _pairs(N_TRAIN, 1, domain_b, MISALIGNED)
    Xv, Yv = _pairs(N_VAL, 2, domain_b)
    pb = Problem(model, space.flat(model), batches, X, Y, Xv, Yv, None)
    F_start = pb.F(model)
    pb.converge(model)
    print(f"\nF: {F_start:.2f} at the LoRA init, {pb.F(model):.2f} at θ̂")
    assert pb.F(model) < F_start - 5  # the fine-tuning learns something
    pb.ecif = ef.ECIF(model, damping=DAMPING, batches=batches, hessian="exact").fit(X, Y)
    return pb


@pytest.fixture(scope="module", params=[BATCH, None], ids=["batch8", "all-negatives"])
def problem(request):
    return _problem(request.param)


@pytest.fixture(scope="module")
def loo():
    """Leave-one-out retraining of every pair, batches of 8: ``(problem, actual ΔF per pair)``."""
    pb = _problem(BATCH)
    F_hat = pb.F(pb.model)
    return pb, torch.tensor([pb.F(pb.retrained_without([k])) - F_hat for k in range(N_TRAIN)])


def test_hessian_is_positive_definite_and_not_damping_dominated(problem):
    L = problem.ecif.solver.L
    lam = torch.linalg.eigvalsh(L @ L.T)
    print(f"\ndamped Hessian eigenvalues {float(lam[0]):.1f} ... {float(lam[-1]):.1f} (δ = {DAMPING})")
    assert float(lam[0]) > 0.3 * DAMPING          # strongly convex around θ̂
    assert float(lam[-1]) > 4 * DAMPING           # the loss curvature, not δ, dominates the top directions


def test_exact_ecif_matches_leave_one_out_on_lora(loo):
    problem, loo = loo
    res = problem.ecif.influence(problem.Xv, problem.Yv)
    scores = {"exact": pearson(res.total, loo), "positive_only": pearson(res.positive, loo),
              "negative_sign_flipped": pearson(res.positive - res.negative, loo),
              "spearman": float(spearmanr(res.total.numpy(), loo.numpy())[0])}
    print(f"\nLoRA LOO: {scores}")
    assert scores["exact"] >= 0.9
    # The negative role visibly matters: classical IF and a wrong-signed negative role are clearly worse.
    assert scores["exact"] > scores["positive_only"] + 0.05
    assert scores["exact"] > scores["negative_sign_flipped"] + 0.2
    # The misaligned pairs are harmful: removing one lowers F, and ECIF says so.
    bad = list(MISALIGNED)
    assert bool((loo[bad] < 0).all()) and bool((res.total[bad] < 0).all())


def test_removal_update_of_top3_tracks_retraining(problem):
    ecif = problem.ecif
    top = ecif.influence(problem.Xv, problem.Yv).total.abs().argsort(descending=True)[:3].tolist()
    theta_hat = ecif.space.flat(problem.model)
    state = ecif.removal_update(top)
    predicted = torch.cat([state[n].reshape(-1) for n in ecif.space.names]) - theta_hat
    actual = ecif.space.flat(problem.retrained_without(top)) - theta_hat
    cos = float(torch.nn.functional.cosine_similarity(predicted, actual, dim=0))
    print(f"\ntop-3 {top}: cos(predicted, actual Δθ) = {cos:.4f}, |predicted|/|actual| = "
          f"{float(predicted.norm() / actual.norm()):.3f}")
    assert cos >= 0.9
    assert torch.equal(ecif.space.flat(ecif.cleaned_model(top)), theta_hat + predicted)
    assert torch.equal(ecif.space.flat(problem.model), theta_hat)  # the fitted model is untouched

"""Ground truth (docs/math.md §6.1) on a LoRA fine-tuning: ECIF vs leave-one-out retraining of a ``peft`` LoRA on a
tiny Hugging Face CLIP, float64, nothing downloaded.

The problem is the evaluation suite's ``clip_lora()`` (``ecif_fast/evaluation/lora_problem.py``, whose docstring
describes the construction): a tiny randomly initialised CLIP "pre-trained" on domain A, LoRA r = 2 (P = 192,
θ_ref = the LoRA init) fine-tuned on n = 32 domain-B pairs (pairs 0 and 9 carry another class's caption) to
max|∇R| < 1e-9 by ``ecif_fast.train`` (L-BFGS, then Newton); every leave-one-out model likewise, warm-started from
θ̂, same batches with the pair deleted (docs/math.md §3). F = the contrastive loss of 16 held-out domain-B pairs as one
batch; fine-tuning lowers it from 59.11 to 51.58 (batches of 8; 52.17 with "all" negatives).

Damping δ = 300. The damped Hessian at θ̂ has eigenvalues 159.4 … 1729.1 (the loss Hessian alone is indefinite,
−140.6 … 1429.1): R is strongly convex around θ̂ while the loss curvature dominates the top directions. Measured
over all 32 pairs (batches of 8): Pearson(ECIF total, actual ΔF) = 0.945, Spearman 0.962 (Taylor negative term:
Pearson 0.903). Both misaligned pairs are predicted and measured harmful (ECIF −0.17, −0.17: the 6th and 5th most
harmful of 32; actual −0.11, −0.08). Removal update of the top-3 pairs by |influence| vs retraining without them:
cosine of the parameter changes 0.960 (norm ratio 0.89); with "all" negatives 0.928 (0.83).
Choosing δ (same problem, other δ): δ = 100 gives λ_min 35.8, λ_max 7978 and Pearson 0.875 (one Newton step
under-shoots the removals); δ = 30 reaches no optimum (max|∇R| = 3.2 after L-BFGS and 5 Newton steps); δ = 1000
gives 0.996 but the damping is then at least half of every eigenvalue (808 … 2097) and fine-tuning barely moves
F (59.11 -> 56.43).

The test can fail: the negative role dropped (positive part only, classical IF) gives Pearson 0.838, the negative
role with the wrong sign 0.606; both are asserted to be clearly below the exact ECIF.

"All" negatives (one batch of 32) is checked here for the Hessian and the removal update only: a second
leave-one-out run does not fit the file's time budget. Measured once over all 32 pairs: Pearson 0.960, Spearman
0.922, positive-only 0.903, wrong sign 0.782, Taylor 0.958; there the misaligned pairs are predicted mildly
harmful (−0.12, −0.05) but removing them raised F (+0.30, +0.12).
"""
from __future__ import annotations

import copy
import functools

import pytest
import torch
from scipy.stats import spearmanr

from ecif_fast.models.params import select_params
from problems import pearson

pytest.importorskip("peft")
pytest.importorskip("transformers")
from ecif_fast.evaluation.lora_problem import P, clip_lora  # noqa: E402

BATCH = 8


@functools.lru_cache(maxsize=None)
def _problem(batch):
    """``(Problem at θ̂, ECIF fitted there)`` with these training batches."""
    pb = clip_lora(batch=batch)
    at_init = copy.deepcopy(pb.model)
    select_params(at_init, pb.params).load_into(at_init, pb.theta_ref)
    F_start = pb.F(at_init)
    print(f"\nF: {F_start:.2f} at the LoRA init, {pb.F():.2f} at θ̂")
    assert pb.F() < F_start - 5  # the fine-tuning learns something
    ecif = pb.ecif(solver="exact")
    assert ecif.space.size == P and all("lora_" in n for n in ecif.space.names)
    return pb, ecif


def _without(pb, removed):
    keep = torch.ones(pb.n, dtype=torch.bool)
    keep[list(removed)] = False
    return pb.retrain(keep)


@pytest.fixture(scope="module", params=[BATCH, None], ids=["batch8", "all-negatives"])
def problem(request):
    return _problem(request.param)


@pytest.fixture(scope="module")
def loo():
    """Leave-one-out retraining of every pair, batches of 8: ``(problem, ECIF, actual ΔF per pair)``."""
    pb, ecif = _problem(BATCH)
    F_hat = pb.F()
    return pb, ecif, torch.tensor([pb.F(_without(pb, [k])) - F_hat for k in range(pb.n)])


def test_hessian_is_positive_definite_and_not_damping_dominated(problem):
    pb, ecif = problem
    L = ecif.solver.L
    lam = torch.linalg.eigvalsh(L @ L.T)
    print(f"\ndamped Hessian eigenvalues {float(lam[0]):.1f} ... {float(lam[-1]):.1f} (δ = {pb.damping})")
    assert float(lam[0]) > 0.3 * pb.damping          # strongly convex around θ̂
    assert float(lam[-1]) > 4 * pb.damping           # the loss curvature, not δ, dominates the top directions


def test_exact_ecif_matches_leave_one_out_on_lora(loo):
    problem, ecif, loo = loo
    res = ecif.influence(problem.Xv, problem.Yv)
    scores = {"exact": pearson(res.total, loo), "positive_only": pearson(res.positive, loo),
              "negative_sign_flipped": pearson(res.positive - res.negative, loo),
              "spearman": float(spearmanr(res.total.numpy(), loo.numpy())[0])}
    print(f"\nLoRA LOO: {scores}")
    assert scores["exact"] >= 0.9
    # The negative role visibly matters: classical IF and a wrong-signed negative role are clearly worse.
    assert scores["exact"] > scores["positive_only"] + 0.05
    assert scores["exact"] > scores["negative_sign_flipped"] + 0.2
    # The misaligned pairs are harmful: removing one lowers F, and ECIF says so.
    bad = problem.misaligned
    assert bool((loo[bad] < 0).all()) and bool((res.total[bad] < 0).all())


def test_removal_update_of_top3_tracks_retraining(problem):
    pb, ecif = problem
    top = ecif.influence(pb.Xv, pb.Yv).total.abs().argsort(descending=True)[:3].tolist()
    theta_hat = ecif.space.flat(pb.model)
    state = ecif.removal_update(top)
    predicted = torch.cat([state[n].reshape(-1) for n in ecif.space.names]) - theta_hat
    actual = ecif.space.flat(_without(pb, top)) - theta_hat
    cos = float(torch.nn.functional.cosine_similarity(predicted, actual, dim=0))
    print(f"\ntop-3 {top}: cos(predicted, actual Δθ) = {cos:.4f}, |predicted|/|actual| = "
          f"{float(predicted.norm() / actual.norm()):.3f}")
    assert cos >= 0.9
    assert torch.equal(ecif.space.flat(ecif.cleaned_model(top)), theta_hat + predicted)
    assert torch.equal(ecif.space.flat(pb.model), theta_hat)  # the fitted model is untouched

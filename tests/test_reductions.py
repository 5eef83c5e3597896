"""Torch twins of the embedding-space ops vs autograd in embedding space (docs/math.md §4, §6.3)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import grad, jvp, vjp

from ecif_fast.core.batches import resolve_batches
from ecif_fast.kernels.torch_ref import ecif_reductions, gauss_newton_product
from ecif_fast.core.loss import batch_loss, per_pair_loss
from ecif_fast.core.pair_terms import pair_score_gradients


def ref_parts(U, V, s, plan, dU, dV, ds, exact):
    """Directional derivatives of ℓ_k and of Σ_{i≠k}(ℓ_i(b) − ℓ_i(b∖k)) by forward-mode autograd."""
    n = U.shape[0]
    pos = torch.zeros(n, dtype=U.dtype)
    neg = torch.zeros(n, dtype=U.dtype)
    for idx in plan.groups():
        B = len(idx)

        def scores(Ub, Vb, sb):
            return sb.exp() * (Ub @ Vb.T)

        prim = (U[idx], V[idx], s)
        tang = (dU[idx], dV[idx], ds)
        for a in range(B):
            keep = torch.arange(B) != a

            def own(Ub, Vb, sb):
                return per_pair_loss(scores(Ub, Vb, sb))[a]

            def others(Ub, Vb, sb):
                S = scores(Ub, Vb, sb)
                if B == 1:
                    return S.new_zeros(())
                if exact:
                    return batch_loss(S) - own(Ub, Vb, sb) - batch_loss(S[keep][:, keep])
                return torch.softmax(S, 1)[keep, a].sum() + torch.softmax(S, 0)[a, keep].sum()

            pos[idx[a]] = jvp(own, prim, tang)[1]
            neg[idx[a]] = jvp(others, prim, tang)[1]
    return pos, neg


def make(n, d, scale, seed, unit=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    U = torch.randn(n, d, generator=g, dtype=dtype)
    V = torch.randn(n, d, generator=g, dtype=dtype)
    if unit:
        U = U / U.norm(dim=1, keepdim=True)
        V = V / V.norm(dim=1, keepdim=True)
    dU = torch.randn(n, d, generator=g, dtype=dtype)
    dV = torch.randn(n, d, generator=g, dtype=dtype)
    return U, V, torch.tensor(float(scale), dtype=dtype).log(), dU, dV, torch.tensor(0.7, dtype=dtype)


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


BATCHES = {"all": None, "chunks": 4, "ragged": [0, 2, 2, 1, 0, 2, 5, 5, 2, 1, 0]}


@pytest.mark.parametrize("batches", BATCHES.keys())
@pytest.mark.parametrize("term", ["exact", "taylor"])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("trained_scale", [False, True])
def test_reductions_match_autograd(batches, term, scale, trained_scale):
    U, V, s, dU, dV, ds = make(11, 3, scale, seed=1)
    ds = ds if trained_scale else torch.zeros_like(ds)
    plan = resolve_batches(BATCHES[batches], 11)
    pos, neg = ecif_reductions(U, V, s.exp(), plan, dU, dV, ds if trained_scale else None, term)
    rpos, rneg = ref_parts(U, V, s, plan, dU, dV, ds, term == "exact")
    assert rel(pos, rpos) < 1e-10
    assert rel(neg, rneg) < 1e-10


def test_query_axis_equals_separate_queries():
    U, V, s, _, _, _ = make(9, 4, 3.0, seed=2)
    g = torch.Generator().manual_seed(5)
    dU = torch.randn(5, 9, 4, generator=g, dtype=torch.float64)
    dV = torch.randn(5, 9, 4, generator=g, dtype=torch.float64)
    ds = torch.randn(5, generator=g, dtype=torch.float64)
    plan = resolve_batches(3, 9)
    pos, neg = ecif_reductions(U, V, s.exp(), plan, dU, dV, ds)
    for q in range(5):
        p1, n1 = ecif_reductions(U, V, s.exp(), plan, dU[q], dV[q], ds[q])
        assert torch.allclose(pos[q], p1, rtol=1e-12, atol=1e-14)
        assert torch.allclose(neg[q], n1, rtol=1e-12, atol=1e-14)


def test_p_close_to_one_is_finite_and_exact():
    """One pair dominates rows and columns so that 1 − p underflows in float64 (p = 1 − e^-60)."""
    U, V, s, dU, dV, _ = make(6, 3, 1.0, seed=3, unit=False)
    U[2] = 30.0 * V[4] / V[4].norm() ** 2 * 2  # S[2, 4] = 60 ≫ the rest of row 2 and column 4
    plan = resolve_batches(None, 6)
    pos, neg = ecif_reductions(U, V, 1.0, plan, dU, dV, None, "exact")
    assert torch.isfinite(pos).all() and torch.isfinite(neg).all()
    rpos, rneg = ref_parts(U, V, torch.tensor(0.0, dtype=torch.float64), plan, dU, dV, torch.tensor(0.0, dtype=torch.float64), True)
    assert rel(neg, rneg) < 1e-9
    E = pair_score_gradients(1.0 * (U @ V.T), True)
    assert torch.isfinite(E).all()


def test_single_pair_batches_have_no_negative_role():
    U, V, s, dU, dV, _ = make(5, 2, 2.0, seed=4)
    plan = resolve_batches(1, 5)
    pos, neg = ecif_reductions(U, V, 2.0, plan, dU, dV)
    assert torch.equal(neg, torch.zeros_like(neg))
    assert torch.allclose(pos, torch.zeros_like(pos))  # ℓ_k = 0 identically when B = 1


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-3), (torch.bfloat16, 1e-3)])
def test_low_precision_inputs_accumulate_in_float32(dtype, tol):
    U, V, s, dU, dV, ds = make(12, 8, 5.0, seed=6)
    U, V, dU, dV = (x.to(dtype) for x in (U, V, dU, dV))
    plan = resolve_batches(5, 12)
    pos, neg = ecif_reductions(U, V, 5.0, plan, dU, dV, None)
    assert pos.dtype == torch.float32
    up = [x.double() for x in (U, V, dU, dV)]
    rpos, rneg = ecif_reductions(up[0], up[1], 5.0, plan, up[2], up[3], None)
    assert rel(pos.double(), rpos) < tol and rel(neg.double(), rneg) < tol


@pytest.mark.parametrize("batches", BATCHES.keys())
@pytest.mark.parametrize("trained_scale", [False, True])
def test_gauss_newton_product_matches_autograd(batches, trained_scale):
    U, V, s, dU, dV, ds = make(11, 3, 4.0, seed=7)
    plan = resolve_batches(BATCHES[batches], 11)
    gU, gV, gs = gauss_newton_product(U, V, s.exp(), plan, dU, dV, ds if trained_scale else None)
    rU, rV, rs = torch.zeros_like(U), torch.zeros_like(V), torch.zeros(())
    for idx in plan.groups():
        def scores(Ub, Vb, sb):
            return sb.exp() * (Ub @ Vb.T)

        tang = (dU[idx], dV[idx], ds if trained_scale else torch.zeros_like(ds))
        S, dS = jvp(scores, (U[idx], V[idx], s), tang)
        G = jvp(grad(batch_loss), (S,), (dS,))[1]  # H_S δS by forward-over-reverse
        _, pull = vjp(scores, U[idx], V[idx], s)
        a, b, c = pull(G)
        rU[idx], rV[idx], rs = a, b, rs + c
    assert rel(gU, rU) < 1e-10 and rel(gV, rV) < 1e-10
    if trained_scale:
        assert abs(float(gs - rs)) < 1e-10 * abs(float(rs))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), d=st.integers(1, 5), bs=st.integers(1, 9), log_scale=st.floats(-3, 4),
       seed=st.integers(0, 10_000), exact=st.booleans())
def test_property_random_shapes(n, d, bs, log_scale, seed, exact):
    U, V, _, dU, dV, ds = make(n, d, 1.0, seed=seed, unit=False)
    s = torch.tensor(log_scale, dtype=torch.float64)
    plan = resolve_batches(bs, n)
    pos, neg = ecif_reductions(U, V, s.exp(), plan, dU, dV, ds, "exact" if exact else "taylor")
    rpos, rneg = ref_parts(U, V, s, plan, dU, dV, ds, exact)
    scale = max(float(rpos.abs().max()), float(rneg.abs().max()), 1e-12)
    # the parts are sums of δS-sized terms that can cancel to ~0 (p → 1 at large logits), so allow a
    # few ulps of the size of those terms on top of the relative tolerance
    terms = float(s.exp()) * float((dU.norm(dim=1) * V.norm(dim=1) + U.norm(dim=1) * dV.norm(dim=1)).max())
    terms += abs(float(ds)) * float(s.exp()) * float((U.norm(dim=1) * V.norm(dim=1)).max())
    atol = 1e-9 * scale + 1e-13 * terms
    assert float((pos - rpos).abs().max()) <= atol
    assert float((neg - rneg).abs().max()) <= atol


# ---------------------------------------------------------------------------------------------------
# Streaming path (batches larger than the chunk size): same results as the materialising path.

from ecif_fast.errors import BackendUnavailableError, ECIFInputError  # noqa: E402
from ecif_fast.kernels import ops  # noqa: E402
from ecif_fast.kernels.torch_ref import common  # noqa: E402

STREAM_BATCHES = {"all": None, "int": 23, "ragged": "ragged"}


def stream_problem(n, d, Q, scale, seed, dtype=torch.float64):
    U, V, s, _, _, _ = make(n, d, scale, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    dU = torch.randn(Q, n, d, generator=g, dtype=torch.float64)
    dV = torch.randn(Q, n, d, generator=g, dtype=torch.float64)
    ds = torch.randn(Q, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (U, V, dU, dV, ds)] + [float(s.exp())]


def stream_plan(kind, n):
    b = STREAM_BATCHES[kind]
    if b == "ragged":  # batches of very different sizes: some streamed, some materialised
        g = torch.Generator().manual_seed(n)
        b = torch.multinomial(torch.tensor([0.55, 0.3, 0.1, 0.05]), n, replacement=True, generator=g)
    return resolve_batches(b, n)


@pytest.mark.parametrize("kind", STREAM_BATCHES.keys())
@pytest.mark.parametrize("term", ["exact", "taylor"])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("trained_scale", [False, True])
@pytest.mark.parametrize("Q", [1, 5])
def test_streaming_reductions_match_materialising(kind, term, scale, trained_scale, Q):
    n = 45
    U, V, dU, dV, ds, t = stream_problem(n, 3, Q, scale, seed=21)
    plan = stream_plan(kind, n)
    ds = ds if trained_scale else None
    pos0, neg0 = ecif_reductions(U, V, scale, plan, dU, dV, ds, term)  # n <= CHUNK: materialising
    for chunk in (7, 16):
        pos, neg = ecif_reductions(U, V, scale, plan, dU, dV, ds, term, chunk=chunk)
        assert rel(pos, pos0) < 1e-10 and rel(neg, neg0) < 1e-10


@pytest.mark.parametrize("term", ["exact", "taylor"])
@pytest.mark.parametrize("trained_scale", [False, True])
def test_streaming_reductions_match_autograd(term, trained_scale, monkeypatch):
    monkeypatch.setattr(common, "CHUNK", 4)  # the module default, read at call time
    U, V, s, dU, dV, ds = make(11, 3, 3.0, seed=22)
    ds = ds if trained_scale else torch.zeros_like(ds)
    plan = resolve_batches(None, 11)
    pos, neg = ecif_reductions(U, V, s.exp(), plan, dU, dV, ds if trained_scale else None, term)
    rpos, rneg = ref_parts(U, V, s, plan, dU, dV, ds, term == "exact")
    assert rel(pos, rpos) < 1e-10 and rel(neg, rneg) < 1e-10


def test_streaming_p_close_to_one_is_finite_and_exact():
    """As test_p_close_to_one_is_finite_and_exact, with the dominating entries in off-diagonal tiles and
    on the diagonal, so that the online top-1 + rest merge meets them across tiles."""
    U, V, s, dU, dV, _ = make(20, 3, 1.0, seed=3, unit=False)
    U[2] = 30.0 * V[14] / V[14].norm() ** 2 * 2   # S[2, 14] = 60: row 2 and column 14 (different tiles)
    U[9] = 40.0 * V[9] / V[9].norm() ** 2 * 2     # S[9, 9] = 80: a diagonal maximum (not special)
    U[17] = 35.0 * V[1] / V[1].norm() ** 2 * 2    # S[17, 1] = 70
    plan = resolve_batches(None, 20)
    zero = torch.tensor(0.0, dtype=torch.float64)
    rpos, rneg = ref_parts(U, V, zero, plan, dU, dV, zero, True)
    pos0, neg0 = ecif_reductions(U, V, 1.0, plan, dU, dV, None, "exact")
    for chunk in (1, 3, 6):
        pos, neg = ecif_reductions(U, V, 1.0, plan, dU, dV, None, "exact", chunk=chunk)
        assert torch.isfinite(pos).all() and torch.isfinite(neg).all()
        assert rel(neg, rneg) < 1e-9 and rel(pos, rpos) < 1e-9
        assert rel(neg, neg0) < 1e-10 and rel(pos, pos0) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 1e-5), (torch.bfloat16, 1e-5)])
def test_streaming_low_precision_matches_materialising(dtype, tol):
    U, V, dU, dV, ds, _ = stream_problem(40, 8, 2, 5.0, seed=23, dtype=dtype)
    plan = resolve_batches(None, 40)
    pos0, neg0 = ecif_reductions(U, V, 5.0, plan, dU, dV, None)
    pos, neg = ecif_reductions(U, V, 5.0, plan, dU, dV, None, chunk=16)
    assert pos.dtype == torch.float32
    assert rel(pos.double(), pos0.double()) < tol and rel(neg.double(), neg0.double()) < tol
    g0 = gauss_newton_product(U, V, 5.0, plan, dU, dV, ds)
    g1 = gauss_newton_product(U, V, 5.0, plan, dU, dV, ds, chunk=16)
    for a, b in zip(g1, g0):
        assert a.dtype == torch.float32 and rel(a.double(), b.double()) < tol


@pytest.mark.parametrize("kind", STREAM_BATCHES.keys())
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("trained_scale", [False, True])
@pytest.mark.parametrize("Q", [1, 5])
def test_streaming_gauss_newton_matches_materialising(kind, scale, trained_scale, Q):
    n = 45
    U, V, dU, dV, ds, _ = stream_problem(n, 3, Q, scale, seed=24)
    plan = stream_plan(kind, n)
    ds = ds if trained_scale else None
    ref = gauss_newton_product(U, V, scale, plan, dU, dV, ds)
    for chunk in (7, 16):
        out = gauss_newton_product(U, V, scale, plan, dU, dV, ds, chunk=chunk)
        assert rel(out[0], ref[0]) < 1e-10 and rel(out[1], ref[1]) < 1e-10
        if trained_scale:  # Σ G∘S cancels between logits of size ~scale: relative to the largest term
            assert float((out[2] - ref[2]).abs().max()) <= 1e-10 * max(float(ref[2].abs().max()), scale)
        else:
            assert torch.equal(out[2], torch.zeros_like(out[2]))


def test_streaming_gauss_newton_matches_autograd(monkeypatch):
    monkeypatch.setattr(common, "CHUNK", 4)
    U, V, s, dU, dV, ds = make(11, 3, 4.0, seed=7)
    plan = resolve_batches(None, 11)
    gU, gV, gs = gauss_newton_product(U, V, s.exp(), plan, dU, dV, ds)

    def scores(Ub, Vb, sb):
        return sb.exp() * (Ub @ Vb.T)

    S, dS = jvp(scores, (U, V, s), (dU, dV, ds))
    G = jvp(grad(batch_loss), (S,), (dS,))[1]
    _, pull = vjp(scores, U, V, s)
    rU, rV, rs = pull(G)
    assert rel(gU, rU) < 1e-10 and rel(gV, rV) < 1e-10 and abs(float(gs - rs)) < 1e-10 * abs(float(rs))


def test_ops_dispatch_and_validation():
    U, V, dU, dV, ds, _ = stream_problem(12, 3, 2, 2.0, seed=25)
    pos0, neg0 = ecif_reductions(U, V, 2.0, resolve_batches(5, 12), dU, dV, ds, "taylor")
    pos, neg = ops.ecif_reductions(U, V, 2.0, 5, dU, dV, ds, "taylor", backend="torch")
    assert torch.equal(pos, pos0) and torch.equal(neg, neg0)
    g0 = gauss_newton_product(U, V, 2.0, resolve_batches(None, 12), dU, dV, ds)
    g1 = ops.gauss_newton_product(U, V, 2.0, None, dU, dV, ds, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    p1, _ = ops.ecif_reductions(U, V, 2.0, 5, dU[0], dV[0], ds[0])  # 2-D directions, automatic backend
    assert p1.shape == (12,)
    with pytest.raises(ECIFInputError):
        ops.ecif_reductions(U, V, 2.0, 5, dU[:, :11], dV[:, :11])
    with pytest.raises(ECIFInputError):
        ops.ecif_reductions(U, V, 2.0, 5, dU, dV[:1])
    with pytest.raises(ECIFInputError):
        ops.ecif_reductions(U, V, 2.0, 5, dU, dV, torch.ones(3, dtype=torch.float64))
    with pytest.raises(ECIFInputError):
        ops.ecif_reductions(U, V, 2.0, 5, dU, dV, None, "approx")
    with pytest.raises(ECIFInputError):
        ops.gauss_newton_product(U, V, 2.0, 5, dU.long(), dV.long())
    with pytest.raises(BackendUnavailableError):
        ops.gauss_newton_product(U, V, 2.0, 5, dU, dV, backend="no-such-backend")


def test_engine_routes_through_ops_backend(monkeypatch):
    """``ECIF(backend=..., curvature="hessian")`` reaches the registry: a forced backend is used for the reductions and the
    Gauss–Newton product, and an unknown one is a clear error."""
    import ecif_fast as ef
    from ecif_fast.kernels import registry
    from problems import heads, paired_features

    X, Y = paired_features(14, seed=4)
    model, _ = heads(True, scale=3.0)
    base = ef.ECIF(model, damping=100.0, batches=5, curvature="gauss-newton", solver="cg").fit(X, Y)
    ref = base.influence(X[:3], Y[:3])
    seen = []
    real = registry.get_op
    monkeypatch.setattr(ops, "get_op", lambda op, dev, backend=None: seen.append((op, backend)) or real(op, dev, backend))
    eng = ef.ECIF(model, damping=100.0, batches=5, curvature="gauss-newton", solver="cg", backend="torch").fit(X, Y)
    out = eng.influence(X[:3], Y[:3])
    assert torch.allclose(out.total, ref.total, rtol=1e-10, atol=1e-12)
    assert ("ecif_reductions", "torch") in seen and ("gauss_newton_product", "torch") in seen
    with pytest.raises(BackendUnavailableError):
        ef.ECIF(model, damping=100.0, batches=5, curvature="gauss-newton", solver="cg",
                backend="no-such-backend").fit(X, Y).influence(X[:3], Y[:3])

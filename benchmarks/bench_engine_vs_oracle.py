"""ECIF embedding-space path vs brute-force autograd oracle (influence of every training pair).

Setting: ``LinearHeads(512, 512, 128, normalize=True)`` in float32 (P = 2·512·128 = 131072), batch
negatives with batch size 256, ``F`` = contrastive loss of 256 validation pairs, ``n`` training pairs.

Both methods need the same ``h = H⁻¹∇F`` (one solve per test function), so ``h`` is computed once per
size (CG, not part of the comparison; its time is reported as the shared cost) and what differs is timed:

(a) engine: ``engine._directions(h[:, None])`` (one JVP pass over the training pairs) followed by
    ``ecif_reductions(...)``, exactly as ``ECIF.influence`` does after the solve;
(b) brute force: ``g_k = ∇R − ∇R_{−k}`` by autograd for every pair ``k``, dotted with ``h``, in two variants
    - batch-local: removing ``k`` changes only its batch, so ``g_k = ∇L_b − ∇L_{b∖k}`` with ``∇L_b`` shared
      by the batch (one backward per batch) and one backward over the ``B−1`` remaining pairs per ``k``;
    - all-data (what ``ecif_fast.oracle.brute_force_pair_gradients`` does): ``∇R`` once, then per ``k`` the
      loss over all ``n−1`` remaining pairs and its backward — O(n²) in total.
    For n > 256 the per-pair part is timed on a fixed random subset of 64 pairs and scaled by n/64; the
    shared part (∇L_b of every batch, resp. ∇R) is timed in full.

Every run asserts that the brute-force values equal the engine's (float32: max relative difference
< 1e-3) on the timed pairs, and at the smallest size also against ``brute_force_pair_gradients`` itself.

Run::

    python -m pytest benchmarks/bench_engine_vs_oracle.py -o python_files='bench_*.py' --benchmark-only
    python benchmarks/bench_engine_vs_oracle.py --write      # medians with perf_counter -> BENCHMARKS.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

import torch

if __name__ == "__main__":  # script mode from a checkout without an editable install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ecif_fast as ef
from ecif_fast.kernels.torch_ref.reductions import ecif_reductions
from ecif_fast.oracle import _loss_on, brute_force_pair_gradients
from sections import write_section  # benchmarks/sections.py

SECTION = "## ECIF engine vs brute-force autograd oracle"

THREADS = 1
torch.set_num_threads(THREADS)

SIZES = (256, 1024, 4096)
BATCH = 256
IN_DIM, EMBED_DIM, LATENT = 512, 128, 64
N_VAL = 256
SUBSET = 64
DAMPING = 1.0
CG_ITERS = 20
RTOL = 1e-3
SEED = 0
DTYPE = torch.float32


# ---------------------------------------------------------------------------------------------- problem
def _features(g: torch.Generator, n: int, A: torch.Tensor, B: torch.Tensor, noise: float = 0.5):
    """Image/text features sharing a latent factor ``z``: ``x = zA + ε``, ``y = zB + ε'``."""
    Z = torch.randn(n, LATENT, generator=g)
    X = Z @ A + noise * torch.randn(n, IN_DIM, generator=g)
    Y = Z @ B + noise * torch.randn(n, IN_DIM, generator=g)
    return X.to(DTYPE), Y.to(DTYPE)


def _model(A: torch.Tensor, B: torch.Tensor, g: torch.Generator) -> ef.LinearHeads:
    """Heads that map the shared latent to the same embedding (``W_img Aᵀ = W_txt Bᵀ = M``) plus noise,
    so matching pairs score highest, as in a trained model (peaked softmax, large exact weights)."""
    model = ef.LinearHeads(IN_DIM, IN_DIM, EMBED_DIM, normalize=True).to(DTYPE)
    M = torch.randn(EMBED_DIM, LATENT, generator=g)
    with torch.no_grad():
        for proj, feat in ((model.image_proj, A), (model.text_proj, B)):
            W = M @ torch.linalg.pinv(feat.T) + 0.02 * torch.randn(EMBED_DIM, IN_DIM, generator=g)
            proj.weight.copy_(W.to(DTYPE))
    return model


@dataclass
class Problem:
    n: int
    engine: ef.ECIF
    h: torch.Tensor            # (P,) = H⁻¹∇F (CG, shared by both methods)
    reference: torch.Tensor    # (n,) engine influence (total), computed once
    subset: torch.Tensor       # pairs whose brute-force cost is timed (all pairs when n == BATCH)
    solve_s: float             # time of ∇F + the CG solve (the shared part, not compared)
    cache: dict = field(default_factory=dict)


_PROBLEMS: dict[int, Problem] = {}


def problem(n: int) -> Problem:
    """The seeded problem of size ``n`` (cached): engine fitted, ``h`` solved, engine reference values."""
    if n in _PROBLEMS:
        return _PROBLEMS[n]
    g = torch.Generator().manual_seed(SEED)
    A = torch.randn(LATENT, IN_DIM, generator=g) / LATENT ** 0.5
    B = torch.randn(LATENT, IN_DIM, generator=g) / LATENT ** 0.5
    model = _model(A, B, g)
    Xv, Yv = _features(torch.Generator().manual_seed(SEED + 1), N_VAL, A, B)
    X, Y = _features(torch.Generator().manual_seed(SEED + 2), n, A, B)
    engine = ef.ECIF(model, damping=DAMPING, batches=BATCH, solver="cg", curvature="gauss-newton",
                     cg_maxiter=CG_ITERS, cg_tol=1e-6).fit(X, Y)
    engine._test_gradients(Xv, Yv, None, False)  # warm-up (first functorch call pays a one-time start-up)
    t0 = time.perf_counter()
    grad_F = engine._test_gradients(Xv, Yv, None, False)[0]
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a capped CG is fine: h only has to be shared
        h = engine.solver.solve(grad_F)
    solve_s = time.perf_counter() - t0
    reference = engine_influence(engine, h)
    if n <= BATCH:
        subset = torch.arange(n)
    else:
        subset = torch.randperm(n, generator=torch.Generator().manual_seed(SEED + 3))[:SUBSET].sort().values
    _PROBLEMS[n] = Problem(n, engine, h, reference, subset, solve_s)
    return _PROBLEMS[n]


# ---------------------------------------------------------------------------------------------- (a) engine
def engine_influence(engine: ef.ECIF, h: torch.Tensor) -> torch.Tensor:
    """Influence of all n pairs given ``h``: one JVP pass + the softmax-weighted reductions."""
    dU, dV, ds = engine._directions(h[:, None])
    pos, neg = ecif_reductions(engine.U, engine.V, engine.log_scale.exp(), engine.plan, dU, dV, ds,
                               engine.negative_term)
    return (pos + neg)[0]


# ---------------------------------------------------------------------------------------------- (b) brute force
def _batch_loss(fm, theta, X, Y) -> torch.Tensor:
    U, V, s = fm.embed(theta, X, Y)
    S = s.exp() * (U @ V.T)
    return torch.logsumexp(S, 1).sum() + torch.logsumexp(S, 0).sum() - 2 * S.diagonal().sum()


def _theta(engine: ef.ECIF) -> torch.Tensor:
    return engine.theta.detach().clone().requires_grad_(True)


def batch_local_shared(engine: ef.ECIF) -> torch.Tensor:
    """``(num_batches, P)``: ``∇L_b`` of every batch (one backward each)."""
    theta = _theta(engine)
    return torch.stack([torch.autograd.grad(_batch_loss(engine.fm, theta, engine.X[g], engine.Y[g]), theta)[0]
                        for g in engine.plan.groups()])


def batch_local_pairs(engine: ef.ECIF, h: torch.Tensor, shared: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``hᵀg_k`` with ``g_k = ∇L_b − ∇L_{b∖k}`` by autograd, one backward over ``B−1`` pairs per ``k``."""
    theta = _theta(engine)
    ids = engine.plan.batch_ids()
    groups = engine.plan.groups()
    out = torch.empty(len(ks), dtype=h.dtype)
    for j, k in enumerate(ks.tolist()):
        b = int(ids[k])
        rest = groups[b][groups[b] != k]
        g_rest = torch.autograd.grad(_batch_loss(engine.fm, theta, engine.X[rest], engine.Y[rest]), theta)[0]
        out[j] = (shared[b] - g_rest) @ h
    return out


def all_data_shared(engine: ef.ECIF) -> torch.Tensor:
    """``(P,)``: ``∇R`` over all data (as ``brute_force_pair_gradients`` computes it)."""
    theta = _theta(engine)
    return torch.autograd.grad(_loss_on(engine.fm, theta, engine.X, engine.Y, engine.plan), theta)[0]


def all_data_pairs(engine: ef.ECIF, h: torch.Tensor, full: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
    """``hᵀg_k`` with ``g_k = ∇R − ∇R_{−k}``, the loss over all ``n−1`` remaining pairs per ``k`` (the oracle's step)."""
    theta = _theta(engine)
    ids = engine.plan.batch_ids()
    n = engine.n
    out = torch.empty(len(ks), dtype=h.dtype)
    for j, k in enumerate(ks.tolist()):
        keep = torch.ones(n, dtype=torch.bool)
        keep[k] = False
        rest = ef.resolve_batches(ids[keep], n - 1)
        g_rest = torch.autograd.grad(_loss_on(engine.fm, theta, engine.X[keep], engine.Y[keep], rest), theta)[0]
        out[j] = (full - g_rest) @ h
    return out


def library_oracle(engine: ef.ECIF, h: torch.Tensor) -> torch.Tensor:
    """``ecif_fast.oracle.brute_force_pair_gradients`` (all pairs, also forms ∇ℓ_k) dotted with ``h``."""
    G, _ = brute_force_pair_gradients(engine.model, engine.X, engine.Y, batches=BATCH)
    return G @ h


def float64_engine_values(p: Problem) -> torch.Tensor:
    """The engine's values for the same problem and the same ``h`` in float64 (accuracy reference)."""
    e = p.engine
    m64 = copy.deepcopy(e.model).double()
    e64 = ef.ECIF(m64, damping=DAMPING, batches=BATCH, solver="cg").fit(e.X.double(), e.Y.double())
    return engine_influence(e64, p.h.double())


def rel_diff(values: torch.Tensor, reference: torch.Tensor) -> float:
    """``max|a − b| / max|b|``."""
    return float((values.double() - reference.double()).abs().max() / reference.double().abs().max())


def check(values: torch.Tensor, reference: torch.Tensor, what: str) -> float:
    err = rel_diff(values, reference)
    assert err < RTOL, f"{what}: brute force differs from the engine by {err:.2e} (relative) > {RTOL:g}"
    return err


# ---------------------------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # script mode without pytest
    pytest = None

#: filled by the benchmarks, printed by benchmarks/conftest.py at the end of the run
RESULTS: dict[int, dict[str, float]] = {}

if pytest is not None:

    @pytest.mark.parametrize("n", SIZES)
    def test_engine(benchmark, n):
        p = problem(n)
        benchmark.group = f"n={n}"
        out = benchmark.pedantic(engine_influence, args=(p.engine, p.h), rounds=5, warmup_rounds=1)
        assert torch.equal(out, p.reference) or rel_diff(out, p.reference) < 1e-6
        RESULTS.setdefault(n, {})["engine_s"] = benchmark.stats.stats.median
        benchmark.extra_info.update(n=n, what="all n pairs", solve_shared_s=p.solve_s)

    @pytest.mark.parametrize("n", SIZES)
    @pytest.mark.parametrize("variant", ["batch_local", "all_data"])
    def test_brute_force(benchmark, n, variant):
        """Benchmarks the per-pair part on ``p.subset``; the shared part is timed once and added."""
        p = problem(n)
        shared_fn, pairs_fn = ((batch_local_shared, batch_local_pairs) if variant == "batch_local"
                               else (all_data_shared, all_data_pairs))
        t0 = time.perf_counter()
        shared = shared_fn(p.engine)
        shared_s = time.perf_counter() - t0
        benchmark.group = f"n={n}"
        vals = benchmark.pedantic(pairs_fn, args=(p.engine, p.h, shared, p.subset), rounds=2, warmup_rounds=0)
        err = check(vals, p.reference[p.subset], f"{variant} n={n}")
        m = len(p.subset)
        estimate = shared_s + benchmark.stats.stats.median * n / m
        RESULTS.setdefault(n, {})[f"{variant}_s"] = estimate
        benchmark.extra_info.update(n=n, timed_pairs=m, shared_s=shared_s, estimated_all_pairs_s=estimate,
                                    rel_diff=err)

    def test_library_oracle_smallest(benchmark):
        """``brute_force_pair_gradients`` itself, all pairs, at the smallest size: equals the engine."""
        n = SIZES[0]
        p = problem(n)
        benchmark.group = f"n={n}"
        vals = benchmark.pedantic(library_oracle, args=(p.engine, p.h), rounds=1, warmup_rounds=0)
        err = check(vals, p.reference, f"brute_force_pair_gradients n={n}")
        RESULTS.setdefault(n, {})["library_oracle_s"] = benchmark.stats.stats.median
        benchmark.extra_info.update(n=n, rel_diff=err)


def speedup_table(results: dict[int, dict[str, float]]) -> str:
    lines = ["| n | engine (ms) | brute batch-local (s) | speedup | brute all-data (s) | speedup |",
             "|---:|---:|---:|---:|---:|---:|"]
    for n in sorted(results):
        r = results[n]
        e = r.get("engine_s", float("nan"))
        bl, ad = r.get("batch_local_s", float("nan")), r.get("all_data_s", float("nan"))
        lines.append(f"| {n} | {1e3 * e:.1f} | {bl:.2f} | {bl / e:.0f}× | {ad:.2f} | {ad / e:.0f}× |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- script mode
def _machine() -> dict[str, str]:
    model = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"cpu": model, "cores": str(os.cpu_count()), "torch": torch.__version__, "threads": str(torch.get_num_threads()),
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run_all(sizes=SIZES, rounds: int = 4, engine_per_round: int = 2, log=print) -> dict:
    """Per size: ``rounds`` interleaved rounds (engine ×2, batch-local, all-data), so that load from other
    jobs on a shared machine hits both sides alike; medians over the rounds."""
    rows = {}
    for n in sizes:
        t0 = time.perf_counter()
        p = problem(n)
        e = p.engine
        m = len(p.subset)
        row = {"solve_s": p.solve_s, "timed_pairs": m}
        engine_influence(e, p.h)  # warm-up
        times = {k: [] for k in ("engine", "batch_local_shared", "batch_local_pairs", "all_data_shared",
                                 "all_data_pairs")}
        vals = {}
        for _ in range(rounds):
            for _ in range(engine_per_round):
                dt, out = _timed(lambda: engine_influence(e, p.h))
                times["engine"].append(dt)
                assert rel_diff(out, p.reference) < 1e-6
            for name, shared_fn, pairs_fn in (("batch_local", batch_local_shared, batch_local_pairs),
                                              ("all_data", all_data_shared, all_data_pairs)):
                dt, shared = _timed(lambda: shared_fn(e))
                times[f"{name}_shared"].append(dt)
                dt, vals[name] = _timed(lambda: pairs_fn(e, p.h, shared, p.subset))
                times[f"{name}_pairs"].append(dt)
        row["engine_s"] = statistics.median(times["engine"])
        for name in ("batch_local", "all_data"):
            shared_s = statistics.median(times[f"{name}_shared"])
            pairs_s = statistics.median(times[f"{name}_pairs"])
            row[f"{name}_shared_s"] = shared_s
            row[f"{name}_pair_s"] = pairs_s / m
            row[f"{name}_s"] = shared_s + pairs_s * n / m
            row[f"{name}_rel"] = check(vals[name], p.reference[p.subset], f"{name} n={n}")
        if n == min(sizes):
            row["library_oracle_s"], lib = _timed(lambda: library_oracle(e, p.h))
            row["library_oracle_rel"] = check(lib, p.reference, f"brute_force_pair_gradients n={n}")
            ref64 = float64_engine_values(p)
            row["engine32_vs_64"] = rel_diff(p.reference, ref64)
            row["brute32_vs_64"] = rel_diff(lib, ref64)
        rows[n] = row
        log(f"n={n}: engine {1e3 * row['engine_s']:.1f} ms, batch-local {row['batch_local_s']:.2f} s "
            f"({row['batch_local_s'] / row['engine_s']:.0f}x), all-data {row['all_data_s']:.2f} s "
            f"({row['all_data_s'] / row['engine_s']:.0f}x), rel diff {row['batch_local_rel']:.1e}/"
            f"{row['all_data_rel']:.1e}   [{time.perf_counter() - t0:.0f} s]")
    return rows


def render(rows: dict, machine: dict) -> str:
    sizes = sorted(rows)
    n0, n1 = sizes[0], sizes[-1]
    sp = {n: (rows[n]["batch_local_s"] / rows[n]["engine_s"], rows[n]["all_data_s"] / rows[n]["engine_s"])
          for n in sizes}
    table = ["| n | engine (ms) | brute batch-local (s) | speedup | brute all-data (s) | speedup | pairs timed | max rel. diff (batch-local / all-data) | shared solve ∇F + CG (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        r = rows[n]
        timed = f"{r['timed_pairs']}" + (" (all)" if r["timed_pairs"] == n else f" → ×{n // r['timed_pairs']}")
        table.append(f"| {n} | {1e3 * r['engine_s']:.1f} | {r['batch_local_s']:.2f} | **{sp[n][0]:.0f}×** | "
                     f"{r['all_data_s']:.2f} | **{sp[n][1]:.0f}×** | {timed} | "
                     f"{r['batch_local_rel']:.1e} / {r['all_data_rel']:.1e} | {r['solve_s']:.1f} |")
    detail = ["| n | JVP+reductions per pair (µs) | batch-local: ∇L_b all batches (s) | per pair (ms) | "
              "all-data: ∇R (s) | per pair (ms) |", "|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        r = rows[n]
        detail.append(f"| {n} | {1e6 * r['engine_s'] / n:.1f} | {r['batch_local_shared_s']:.3f} | "
                      f"{1e3 * r['batch_local_pair_s']:.2f} | {r['all_data_shared_s']:.3f} | {1e3 * r['all_data_pair_s']:.2f} |")
    lib = rows[n0].get("library_oracle_s")
    D, B = IN_DIM, BATCH
    model_ratio = B * (12 * D + 6 * B) / (8 * D + 26 * B)
    ratio = n1 / n0
    return f"""# Benchmarks

## ECIF engine vs brute-force autograd oracle

Influence of **every** training pair on one test function, given `h = H⁻¹∇F`.
Generated by `python benchmarks/bench_engine_vs_oracle.py --write` (do not edit the numbers by hand).

**Machine:** {machine['cpu']}, {machine['cores']} cores (shared, noisy), torch {machine['torch']} (CPU),
`torch.set_num_threads({machine['threads']})`, Python {machine['python']}, {machine['date']}.

**Setting:** `ecif_fast.LinearHeads(512, 512, 128, normalize=True)`, float32, P = 2·512·128 = 131072 parameters,
fixed logit scale 1/0.07. Features: 512-d image and text features sharing a 64-d latent factor
(`x = zA + 0.5ε`, `y = zB + 0.5ε'`, seeded), heads initialised to map the latent to the same embedding, so matching
pairs score highest (peaked softmax as in a trained model). Batch negatives, `batches=256`, `negative_term="exact"`.
F = contrastive loss of 256 validation pairs. `h` comes from `solver="cg"` (Gauss–Newton curvature,
damping {DAMPING}, relative residual 1e-6 or at most {CG_ITERS} iterations); that solve is the same for both methods, so it is **not** in the compared
times (last column, for scale only).

- **engine** = `engine._directions(h[:, None])` (one JVP pass over the n pairs) + `ecif_reductions(...)`,
  as `ECIF.influence` does after the solve; all n pairs.
- **brute batch-local** = `g_k = ∇L_b − ∇L_(b∖k)` by autograd (removing k only changes its own batch b):
  `∇L_b` once per batch (timed for all batches) + one forward/backward over the B−1 remaining pairs per k, then `g_k·h`.
- **brute all-data** = what `ecif_fast.oracle.brute_force_pair_gradients` does: `∇R` once, then per k the loss
  over all n−1 remaining pairs and its backward (`g_k = ∇R − ∇R_(−k)`), then `g_k·h`.
- **Subsampling:** for n = 1024 and 4096 the per-pair part of both brute-force variants is timed on a fixed random
  subset of {SUBSET} pairs and **scaled by n/{SUBSET}** (per-pair cost does not depend on which pair); the shared part
  (`∇L_b` of every batch, resp. `∇R`) is timed in full and added. At n = 256 all pairs are timed, nothing is scaled.
- **Timing:** `time.perf_counter`, 4 interleaved rounds per size (engine twice, then batch-local, then all-data), so
  load from other jobs on the shared machine hits both sides alike; medians (engine over 8 runs after a warm-up,
  brute force over 4). The library oracle at n = 256 is timed once.
- **Same numbers:** every timed brute-force value is asserted equal to the engine's value for that pair
  (max |Δ| / max |engine| < {RTOL:g}, float32; in float64 `tests/test_oracle.py` gets < 1e-10). At n = {n0} the library
  oracle `brute_force_pair_gradients` itself (all {n0} pairs, which also forms the positive-only gradients) gives
  max rel. diff {rows[n0].get('library_oracle_rel', float('nan')):.1e} and took {lib if lib is not None else float('nan'):.1f} s.
  The float32 differences are the brute force's own rounding error (`∇R − ∇R_(−k)` cancels two large gradients):
  against the engine run in float64 with the same `h`, the float32 engine is off by
  {rows[n0].get('engine32_vs_64', float('nan')):.1e} and the float32 library oracle by {rows[n0].get('brute32_vs_64', float('nan')):.1e} (n = {n0}).

{chr(10).join(table)}

Per-pair costs:

{chr(10).join(detail)}

### How the speedup grows with n

From n = {n0} to n = {n1} (×{ratio:.0f} pairs) the batch-local speedup goes {sp[n0][0]:.0f}× → {sp[n1][0]:.0f}×
(×{sp[n1][0] / sp[n0][0]:.1f}) and the all-data speedup {sp[n0][1]:.0f}× → {sp[n1][1]:.0f}× (×{sp[n1][1] / sp[n0][1]:.1f}).

Cost model (D = 512 input dim, d = 128 embedding dim, B = 256 batch size; FLOPs per training pair):

- engine ≈ one JVP pass over the n pairs (primal + tangent through both heads, ≈ 8·D·d) + the reductions
  (`ecif_reductions`: 13 B×B×d products per batch, ≈ 26·B·d per pair, plus O(B) elementwise softmax/weight work).
  Total O(n·(D·d + B·d)): **linear in n**.
- brute batch-local ≈ one forward+backward over the pair's whole batch per pair: heads ≈ 12·B·D·d, scores ≈ 6·B²·d.
  Also linear in n, so the ratio is **constant in n and of order B**: B·(12D + 6B)/(8D + 26B) ≈ {model_ratio:.0f}× in
  FLOPs here (the engine pays for each pair once, the brute force pays for its whole batch once per pair).
  At n = B = 256 (a single batch) both brute-force variants do the same work.
- brute all-data ≈ one forward+backward over all n−1 pairs per pair: O(n²·(D·d + B·d)), so the ratio
  **grows linearly with n**: ≈ (batch-local ratio) × n/B, i.e. ×{ratio:.0f} from n = {n0} to n = {n1}.

Measured: the batch-local ratio changes ×{sp[n1][0] / sp[n0][0]:.1f} over ×{ratio:.0f} more pairs (model: ×1) and stays
at {min(v[0] for v in sp.values()):.0f}–{max(v[0] for v in sp.values()):.0f}× (model ≈ {model_ratio:.0f}×: the engine's
elementwise softmax/weight passes are not in the FLOP count, and per-call Python/autograd dispatch adds a fixed cost);
the all-data ratio grows ×{sp[n1][1] / sp[n0][1]:.1f} (model: ×{ratio:.0f}). Timings on this shared 2-core machine vary
by up to ~2× between runs (other jobs), so read the ratios to within that.
"""


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md at the repo root")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    args = ap.parse_args(argv)
    machine = _machine()
    print(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, threads {machine['threads']}")
    rows = run_all(args.sizes)
    text = render(rows, machine)
    if args.write:
        body = text.split("\n", 1)[1].lstrip("\n") if text.startswith("# Benchmarks") else text
        write_section(SECTION, body)
        print(f"wrote the {SECTION!r} section of BENCHMARKS.md")
    else:
        print(text)


if __name__ == "__main__":
    main()

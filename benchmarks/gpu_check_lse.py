"""GPU check of the Triton ``lse`` kernel: correctness vs the torch twin (and a float64 brute force on
small shapes), and timing side by side with the torch twin and a naive ``torch.logsumexp(t*U@V.T)``.

Run on a CUDA machine from the repository root:

    python benchmarks/gpu_check_lse.py            # about a minute; exits 1 on any mismatch or error

``--dry-run-cpu`` runs the same script logic on the CPU in Triton's interpreter with shrunken shapes
(slow, a smoke test of the script itself; its timings mean nothing).

Needs only torch + triton + this checkout (the C++ extension ``ecif_fast._C`` is not used; the
package imports without it). Prints the GPU name, every case with its max error and tolerance,
the kernel's tile configuration, and a timing table (median of a few runs, CUDA events).
"""
from __future__ import annotations

import math
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout

import torch  # noqa: E402

T_START = time.time()
TIME_BUDGET_S = 100.0  # after this, timing is cut to a single run per case (checks still run)
DRY = "--dry-run-cpu" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"


def main() -> int:
    if not DRY and not torch.cuda.is_available():
        print("CUDA is not available: this script checks the Triton kernel on a GPU")
        return 2
    import triton

    from ecif_fast.kernels import registry, triton_backend
    from ecif_fast.core.batches import resolve_batches
    from ecif_fast.kernels.ops import lse as ops_lse
    from ecif_fast.kernels.torch_ref.lse import lse as twin_lse

    torch.backends.cuda.matmul.allow_tf32 = False  # the twin is the float32 reference
    torch.set_float32_matmul_precision("highest")
    dev = torch.device("cpu" if DRY else "cuda")
    dev_name = "CPU, Triton interpreter (dry run)" if DRY else torch.cuda.get_device_name()
    print(f"device: {dev_name}  (torch {torch.__version__}, triton {triton.__version__})")

    def sync():
        if not DRY:
            torch.cuda.synchronize()

    def free_bytes():
        return 2e9 if DRY else torch.cuda.mem_get_info()[0]

    def shrink(n, d):  # dry run: small shapes, same structure
        return (max(n // 256, 64), min(d, 40)) if DRY else (n, d)
    assert triton_backend.available(), triton_backend.unavailable_reason()
    tlse = triton_backend.lse
    failures = []
    timings = []

    def unit(n, d, gen):
        x = torch.randn(n, d, generator=gen, device=dev, dtype=torch.float32)
        return torch.nn.functional.normalize(x, dim=1)

    def tolerance(U, V, t, plan, dtype, k):
        eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        mag = abs(t) * float(U.double().norm(dim=1).max()) * float(V.double().norm(dim=1).max())
        return k * eps * (mag * math.sqrt(U.shape[1]) + math.log(int(plan.sizes.max())) + 1)

    def brute64(U, V, t, plan):
        U, V = U.double(), V.double()
        row = torch.empty(plan.n, dtype=torch.float64, device=dev)
        col = torch.empty(plan.n, dtype=torch.float64, device=dev)
        for idx in plan.groups():
            idx = idx.to(dev)
            S = t * (U[idx] @ V[idx].T)
            row[idx], col[idx] = torch.logsumexp(S, 1), torch.logsumexp(S, 0)
        return row, col

    def timeit(fn, reps):
        if time.time() - T_START > TIME_BUDGET_S:
            reps = 1
        fn()  # warm-up (compilation, allocator)
        sync()
        ts = []
        for _ in range(reps):
            if DRY:
                t0 = time.perf_counter()
                fn()
                ts.append(1e3 * (time.perf_counter() - t0))
                continue
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ts.append(a.elapsed_time(b))
        ts.sort()
        return ts[len(ts) // 2]

    def compare(tag, got, ref, tol):
        err = max(float((g.double() - r.double()).abs().max()) for g, r in zip(got, ref))
        bad = not (err <= tol) or not all(bool(torch.isfinite(g).all()) for g in got)
        print(f"  {'FAIL' if bad else 'ok  '} {tag}: max abs err {err:.3g} (tol {tol:.3g})")
        if bad:
            failures.append(f"{tag}: err {err:.3g} > tol {tol:.3g}")

    def case(name, n, d, batches, dtypes, t, *, brute=False, naive="full", reps=5, time_it=True):
        n, d = shrink(n, d)
        if DRY:
            reps = 1
            if torch.is_tensor(batches):
                batches = batches[:n]
            elif isinstance(batches, int):
                batches = min(batches, n // 4)  # (n // 256) // 4 divides n // 256 for the bmm case
        gen = torch.Generator(device=dev).manual_seed(n + d)
        plan = resolve_batches(batches, n)
        U32, V32 = unit(n, d, gen), unit(n, d, gen)
        print(f"\n== {name}: n={n} d={d} batches={plan.num_batches} (largest {int(plan.sizes.max())}) t={t}")
        for dtype in dtypes:
            tag = f"{name} {str(dtype).replace('torch.', '')}"
            try:
                U, V = U32.to(dtype), V32.to(dtype)
                with warnings.catch_warnings(record=True) as w:
                    warnings.simplefilter("always")
                    got = tlse(U, V, t, plan)
                    sync()
                for x in w:
                    print(f"  warning: {x.message}")
                print(f"  launch: {triton_backend.last_launch()}")
                ref = twin_lse(U, V, t, plan)
                compare(f"{tag} vs twin", got, ref, tolerance(U, V, t, plan, dtype, 16))
                if brute:
                    compare(f"{tag} vs float64", got, brute64(U, V, t, plan), tolerance(U, V, t, plan, dtype, 8))
                del ref
                if not time_it:
                    continue
                tt = timeit(lambda: tlse(U, V, t, plan), reps)
                tw = timeit(lambda: twin_lse(U, V, t, plan), max(1, reps // 2))
                tn = None
                free = free_bytes()
                if naive == "full" and 5 * n * n * 4 < 0.8 * free:  # S, t*S, logsumexp temporaries
                    def naive_fn():
                        S = t * U @ V.T
                        return torch.logsumexp(S, 1), torch.logsumexp(S, 0)
                    try:
                        tn = timeit(naive_fn, max(1, reps // 2))
                    except torch.cuda.OutOfMemoryError:
                        tn = None
                        torch.cuda.empty_cache()
                elif naive == "bmm":  # equal batch sizes: block-diagonal scores by torch.bmm
                    B = int(plan.sizes[0])
                    Ub, Vb = U.view(n // B, B, d), V.view(n // B, B, d)

                    def naive_fn():
                        S = t * torch.bmm(Ub, Vb.transpose(1, 2))
                        return torch.logsumexp(S, 2), torch.logsumexp(S, 1)
                    tn = timeit(naive_fn, max(1, reps // 2))
                if not DRY:
                    torch.cuda.empty_cache()
                timings.append((tag, tt, tw, tn, naive))
            except Exception as e:  # a compile or launch error is a failure, keep going
                traceback.print_exc()
                failures.append(f"{tag}: {type(e).__name__}: {str(e)[:300]}")
                if not DRY:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()

    three = [torch.float32, torch.bfloat16, torch.float16]
    gen = torch.Generator().manual_seed(0)
    # small shapes, every code path: ragged (gathers), one small batch (split columns), tiny d, float64
    case("small-ragged", 3000, 64, torch.randint(0, 40, (3000,), generator=gen), three + [torch.float64], 100.0,
         brute=True, naive="none", time_it=False)
    case("small-all-split", 2048, 100, None, three + [torch.float64], 30.0, brute=True, naive="none", time_it=False)
    case("tiny-d", 777, 3, 100, [torch.float32, torch.bfloat16, torch.float64], 0.01, brute=True, naive="none",
         time_it=False)
    case("negative-scale", 1000, 640, None, [torch.float32, torch.bfloat16], -20.0, brute=True, naive="none",
         time_it=False)
    # big shapes: "all" negatives and many fixed batches
    case("all", 65536, 256, None, three, 100.0, naive="full", reps=5)
    case("batches", 262144, 512, 512, three, 100.0, naive="bmm", reps=5)
    case("ragged-big", 131072, 256, torch.randint(0, 200, (131072,), generator=gen), three, 100.0,
         naive="none", reps=5)

    # dispatch: automatic choice on CUDA tensors is triton; the public op gives the same result
    try:
        U = 2 * unit(300, 32, torch.Generator(device=dev).manual_seed(1))
        if not DRY:
            assert registry.resolve("lse", U)[0] == "triton", registry.resolve("lse", U)[0]
        r1, c1 = ops_lse(U, U.flip(0), 5.0, 64, backend=None if not DRY else "triton")
        r2, c2 = ops_lse(U, U.flip(0), 5.0, 64, backend="torch")
        compare("dispatch ops.lse auto vs torch", (r1, c1), (r2, c2), 1e-3)
    except Exception as e:
        traceback.print_exc()
        failures.append(f"dispatch: {type(e).__name__}: {e}")

    print(f"\n== timing on {dev_name} (median ms; ratio = other / triton, >1 means triton is faster)")
    print(f"{'case':<24}{'triton':>10}{'twin':>10}{'twin/tri':>10}{'naive':>10}{'naive/tri':>11}  naive kind")
    for tag, tt, tw, tn, kind in timings:
        ns = f"{tn:10.3f}{tn / tt:11.2f}" if tn is not None else f"{'n/a':>10}{'':>11}"
        kind_s = {"full": "logsumexp(t*U@V.T)", "bmm": "logsumexp(t*bmm) per batch",
                  "none": "-"}[kind] if tn is not None else ("does not fit" if kind == "full" else "-")
        print(f"{tag:<24}{tt:10.3f}{tw:10.3f}{tw / tt:10.2f}{ns}  {kind_s}")
    print(f"\ntotal {time.time() - T_START:.1f} s")
    if failures:
        print(f"\n{len(failures)} FAILURE(S):")
        for f in failures:
            print("  " + f)
        return 1
    print("\nALL CHECKS PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())

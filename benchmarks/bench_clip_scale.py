"""Real CLIP model on CPU: ECIF stage by stage against one forward+backward pass, the oracle and TRAK.

Setting: a randomly initialised ViT-B/32-sized ``transformers.CLIPModel`` (the default ``CLIPConfig()``:
vision 768 wide × 12 layers, patch 32, 224×224; text 512 wide × 12 layers; projection 512), float32,
``attn_implementation="sdpa"``, wrapped with ``ecif_fast.wrap``. Parameters: LoRA (``peft``, r = 8 on
``q_proj`` and ``v_proj`` of both towers, ``init_lora_weights=False`` so that B ≠ 0: a fresh LoRA has B = 0,
which makes every gradient with respect to A vanish) and, as a second row, the two projection heads.
Data: random pixel values and random token ids (BOS, 16–32 tokens, EOS, padded with EOS to 32: CLIP pools
at the first EOS under a causal mask, so the padding changes nothing). n training pairs in batches
(batch negatives), F = contrastive loss of the validation pairs as one batch.

Measured in one process, side by side, as ratios to **one forward+backward pass over the training set**
(the docs/math.md §2 loss of every training batch, backward to the selected parameters, one batch at a time, through
the wrapper, i.e. the SDPA math kernel the JVP needs; the default SDPA kernel is timed too):

* ECIF stages: fit (embeddings of all pairs), ∇F, solve (matrix-free CG on the Gauss–Newton product,
  curvature subsampled to ``--hessian-batches`` batches, ``--cg-iters`` iterations), JVP pass
  (``ECIF._directions``), reductions (``ops.ecif_reductions``); the total without the solve is the
  "≤ 4× one fwd+bwd" target, the solve is reported beside it.
* brute-force oracle: ``g_k = ∇L_b − ∇L_{b∖k}`` by autograd through the whole model (removing k only
  changes its batch b), dotted with the same ``h = H⁻¹∇F``; timed on ``--oracle-subset`` pairs and scaled by
  n / subset (``∇L_b`` of the touched batches timed and scaled by batches / touched); its values are checked
  against ECIF's on those pairs.
* TRAK (``traker``, ``task="clip"``, ``CLIPModelOutput``) on the same pairs, scoring the same validation
  pairs, on the same LoRA parameters, ``BasicProjector`` on CPU: the pool of embeddings (its
  ``get_embeddings`` step, done on CPU here because traker's own version calls ``.cuda()``), featurize,
  finalize features, score, finalize scores; Spearman / Pearson of its per-pair score (summed over the
  validation pairs) against ECIF's influence.

Memory: the peak resident set of each stage, in the same process: before a stage the script collects
garbage, returns freed heap to the OS (``malloc_trim``) and resets the kernel's high-water mark
(``/proc/self/clear_refs`` ← 5); after it, ``VmHWM`` is the stage's peak (exact, page-accounted) and
"extra" is that peak minus the resident set at the stage's start.

Run::

    python benchmarks/bench_clip_scale.py --layers 2 --n 64 --batch 32 --val 16      # < 1 min, debugging
    python benchmarks/bench_clip_scale.py --write        # full size, ~20 min on 2 cores; BENCHMARKS.md section
    python -m pytest benchmarks/bench_clip_scale.py -o python_files='bench_*.py' --benchmark-only   # tiny
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
import warnings

import torch

if __name__ == "__main__":  # script mode from a checkout without an editable install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ecif_fast as ef
from ecif_fast.kernels import ops, registry
from ecif_fast.solvers import CGSolver
from sections import read_section, write_section as write_section_in  # benchmarks/sections.py

SECTION = "## Real CLIP model (ViT-B/32 size, CPU)"
PROBE = "### Engine memory beyond one chunk: bigger batches, test sets and removed sets"
BASE, BASE_END = "fwd+bwd (math SDPA)", "fwd+bwd (math SDPA), again at the end"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOS, EOS = 49406, 49407  # CLIP's tokenizer ids (CLIPTextConfig's defaults)
TINY = dict(hidden=32, layers=1, image=32, patch=16, seq=8, vocab=100)  # the pytest-benchmark size


# ---------------------------------------------------------------------------------------------- memory
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Stages:
    """Times and peak memory of named stages, in order (see the module docstring for the method)."""

    def __init__(self, log=print):
        self.rows: dict[str, dict] = {}
        self.log = log
        self.reference = None  # (fn, scale): timed right before each stage, × scale = the adjacent baseline
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.exact_peak = True
        except OSError:  # not Linux, or not allowed: fall back to the whole-run peak (ru_maxrss)
            self.exact_peak = False

    def run(self, name: str, fn, *args, ref: bool = True, **kwargs):
        adjacent = None
        if ref and self.reference is not None:
            rfn, scale = self.reference
            t0, c0 = time.perf_counter(), time.process_time()
            rfn()
            adjacent = {"ref_s": (time.perf_counter() - t0) * scale, "ref_cpu_s": (time.process_time() - c0) * scale}
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        rss0 = _status_mib("VmRSS")
        if self.exact_peak:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        peak = _status_mib("VmHWM")
        self.rows[name] = {"s": dt, "cpu_s": cpu, "peak_mib": peak, "extra_mib": peak - rss0, "start_mib": rss0,
                           **(adjacent or {})}
        self.log(f"  {name:<34s} {dt:8.2f} s  (CPU {cpu:8.2f} s)   peak {peak:8.0f} MiB   extra "
                 f"{peak - rss0:7.0f} MiB   load {os.getloadavg()[0]:.1f}"
                 + (f"   adjacent fwd+bwd {adjacent['ref_s']:.1f} s" if adjacent else ""))
        return out


# ---------------------------------------------------------------------------------------------- problem
def build_clip(layers: int, seed: int, tiny: bool = False):
    """Random-init CLIPModel: the default ``CLIPConfig()`` (ViT-B/32 shapes) with ``layers`` layers per tower."""
    from transformers import CLIPConfig, CLIPModel

    if tiny:
        h, L = TINY["hidden"], TINY["layers"]
        text = dict(vocab_size=TINY["vocab"], hidden_size=h, intermediate_size=2 * h, num_hidden_layers=L,
                    num_attention_heads=2, max_position_embeddings=TINY["seq"], eos_token_id=TINY["vocab"] - 1,
                    bos_token_id=TINY["vocab"] - 2, pad_token_id=1)
        vision = dict(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=L, num_attention_heads=2,
                      image_size=TINY["image"], patch_size=TINY["patch"])
        cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    else:
        cfg = CLIPConfig(text_config={"num_hidden_layers": layers}, vision_config={"num_hidden_layers": layers})
    torch.manual_seed(seed)
    return CLIPModel._from_config(cfg, attn_implementation="sdpa").float().eval()


def add_lora(clip, rank: int, seed: int):
    """peft LoRA on q_proj, v_proj of both towers; init_lora_weights=False: A and B random (nn.Linear init)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed + 1)
    return get_peft_model(clip, LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))


def make_pairs(n: int, seed: int, tiny: bool = False):
    """``(pixel_values (n, 3, H, W), input_ids (n, L))``: random pixels; BOS, random ids, EOS, EOS padding."""
    g = torch.Generator().manual_seed(seed)
    if tiny:
        size, L, lo, hi, bos, eos = TINY["image"], TINY["seq"], 3, 5, TINY["vocab"] - 2, TINY["vocab"] - 1
    else:
        size, L, lo, hi, bos, eos = 224, 32, 16, 32, BOS, EOS
    px = torch.randn(n, 3, size, size, generator=g)
    ids = torch.randint(0, bos, (n, L), generator=g)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g)
    ids[:, 0] = bos
    pos = torch.arange(L)
    ids[pos[None, :] >= (lengths[:, None] - 1)] = eos  # the caption's EOS, then EOS padding
    return px, ids


def heads_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters()
            if n.endswith("visual_projection.weight") or n.endswith("text_projection.weight")]


def train_only(model, names):
    """``requires_grad`` on exactly ``names`` (the baseline's backward goes to them, as training would)."""
    keep = set(names)
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)


# ---------------------------------------------------------------------------------------------- baseline
def fwd_bwd(model, X, Y, batch: int, default_sdpa: bool = False):
    """One forward+backward over the training set: the docs/math.md §2 loss of each batch, backward to the parameters
    with ``requires_grad`` (gradients accumulate over the batches, one batch of activations alive at once).
    ``default_sdpa``: the towers through CLIP's own call (default SDPA dispatch) instead of the math kernel."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    clip = model.clip
    for a in range(0, X.shape[0], batch):
        x, y = X[a:a + batch], Y[a:a + batch]
        if default_sdpa:
            u = clip.get_image_features(pixel_values=x)
            v = clip.get_text_features(input_ids=y)
            u = u if torch.is_tensor(u) else u.pooler_output
            v = v if torch.is_tensor(v) else v.pooler_output
            u, v = u / u.norm(dim=-1, keepdim=True), v / v.norm(dim=-1, keepdim=True)
        else:
            u, v = model.encode_image(x), model.encode_text(y)
        ef.contrastive_loss(u, v, model.logit_scale.exp()).backward()
    return torch.cat([p.grad.reshape(-1) for p in params])


# ---------------------------------------------------------------------------------------------- ECIF
def ecif_stages(st: Stages, model, X, Y, Xv, Yv, args, params, prefix: str):
    """Fit, ∇F, CG solve, JVP pass, reductions, each timed; returns the engine, h, influences and solve info."""
    sub = pick_batches(X.shape[0], args)
    eng = ef.ECIF(model, damping=1.0, batches=args.batch, solver="cg", curvature="gauss-newton", params=params,
                  cg_tol=1e-12, cg_maxiter=args.cg_iters, hessian_batches=sub, chunk_size=args.chunk_size)
    st.run(f"{prefix}fit", eng.fit, X, Y)
    # damping: damping_fraction × tr(C)/P, tr(C) by Hutchinson with a few probes (set-up, timed apart)
    t0 = time.perf_counter()
    tr = eng.curvature.trace_estimate(probes=args.trace_probes, seed=args.seed)
    trace_s = time.perf_counter() - t0
    eng.damping = args.damping_fraction * tr / eng.curvature.size
    eng.solver = CGSolver(eng.curvature, eng.damping, 1e-12, args.cg_iters)
    G = st.run(f"{prefix}grad F", eng._test_gradients, Xv, Yv, None, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        Hq = st.run(f"{prefix}solve", eng.solver.solve, G.T.contiguous())
    resid = float("nan")
    for w in caught:
        m = re.search(r"relative residual ([0-9.e+-]+)", str(w.message))
        if m:
            resid = float(m.group(1))
    dU, dV, ds = st.run(f"{prefix}JVP pass", eng._directions, Hq)
    pos, neg = st.run(f"{prefix}reductions", ops.ecif_reductions, eng.U, eng.V, eng.log_scale.exp(), eng.plan,
                      dU, dV, ds, eng.negative_term)
    info = {"P": eng.space.size, "damping": eng.damping, "trace": tr, "trace_s": trace_s, "residual": resid,
            "iterations": eng.solver.last_iterations, "hessian_batches": sub,
            "num_batches": len(eng.plan.groups()), "grad_F_norm": float(G.norm())}
    return eng, Hq[:, 0], pos[0], neg[0], info


def pick_batches(n: int, args):
    nb = -(-n // args.batch)
    if args.hessian_batches >= nb:
        return None
    g = torch.Generator().manual_seed(args.seed + 5)
    return torch.randperm(nb, generator=g)[:args.hessian_batches].sort().values.tolist()


# ---------------------------------------------------------------------------------------------- oracle
def oracle_subset(n: int, batch: int, k: int) -> list[int]:
    """``k`` fixed pairs: half from the first batch, half from the last (two batches' ``∇L_b``)."""
    last = ((n - 1) // batch) * batch
    first = list(range(0, min(batch, n), max(1, min(batch, n) // max(1, k // 2))))[:k // 2]
    second = list(range(last, n, max(1, (n - last) // max(1, k - k // 2))))[:k - len(first)]
    return sorted(set(first + second))


def oracle(st: Stages, eng, h, ks):
    """``hᵀ g_k``, ``g_k = ∇L_b − ∇L_{b∖k}`` by autograd through the model, for the pairs ``ks``; ``(values,
    touched batches)``."""
    theta = eng.theta.detach().clone().requires_grad_(True)
    ids = eng.plan.batch_ids()
    groups = eng.plan.groups()

    def grad_of(idx):
        U, V, s = eng.fm.embed(theta, eng.X[idx], eng.Y[idx])
        return torch.autograd.grad(ef.contrastive_loss(U, V, s.exp()), theta)[0]

    touched = sorted({int(ids[k]) for k in ks})
    shared = st.run("oracle: ∇L_b of the touched batches", lambda: {b: grad_of(groups[b]) for b in touched})

    def pairs():
        out = []
        for k in ks:
            b = int(ids[k])
            out.append(float((shared[b] - grad_of(groups[b][groups[b] != k])) @ h))
        return torch.tensor(out, dtype=h.dtype)

    vals = st.run("oracle: per pair (subset)", pairs)
    return vals, touched


# ---------------------------------------------------------------------------------------------- TRAK
def trak_scores(st: Stages, model, X, Y, Xv, Yv, args, lora_names):
    """TRAK's CLIP task on the same pairs and LoRA parameters, each stage timed
    (``ecif_fast.evaluation.peers.trak_clip``, with the traker 0.3.2 workarounds); ``(scores (n, n_val), details)``."""
    from ecif_fast.evaluation.peers import trak_clip

    return trak_clip(model, lora_names, X, Y, Xv, Yv, batch=args.batch, proj_dim=args.proj_dim, seed=args.seed + 7,
                     run=st.run)


# ---------------------------------------------------------------------------------------------- statistics
def pearson(a, b) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def spearman(a, b) -> float:
    def rank(x):
        return x.argsort().argsort().double()
    return pearson(rank(a), rank(b))


def rel_diff(values, reference) -> float:
    return float((values.double() - reference.double()).abs().max() / reference.double().abs().max())


# ---------------------------------------------------------------------------------------------- run
def run(args, log=print) -> dict:
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    clip = build_clip(args.layers, args.seed, args.tiny)
    peft_model = add_lora(clip, args.rank, args.seed)
    model = ef.wrap(peft_model)
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    X, Y = make_pairs(args.n, args.seed + 2, args.tiny)
    Xv, Yv = make_pairs(args.val, args.seed + 3, args.tiny)
    n_params = sum(p.numel() for p in model.parameters())
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"model: {n_params / 1e6:.1f} M parameters, LoRA {n_lora}"
        f"; n = {args.n}, batch {args.batch}, val {args.val}; threads {torch.get_num_threads()}; "
        f"load {load_start}")
    # warm-up (first calls pay one-time start-up costs): a small fwd+bwd, a JVP, a per-sample grad
    fwd_bwd(model, X[:4], Y[:4], 4)
    w = ef.ECIF(model, damping=1.0, batches=4, solver="cg", curvature="gauss-newton", cg_maxiter=1,
                chunk_size=4).fit(X[:4], Y[:4])
    w._directions(torch.ones(w.space.size, 1))
    del w
    st = Stages(log)
    res: dict = {"args": vars(args).copy(), "n_params": n_params}

    # baseline(s)
    train_only(model, lora)
    st.run("fwd+bwd (math SDPA)", fwd_bwd, model, X, Y, args.batch)
    if args.sdpa_reference:
        st.run("fwd+bwd (default SDPA)", fwd_bwd, model, X, Y, args.batch, True)
    # from here on each stage is preceded by the forward+backward of one training batch (× number of batches):
    # its "adjacent" baseline, so load from other jobs that comes and goes during the run hits both alike
    nb = -(-args.n // args.batch)
    st.reference = (lambda: fwd_bwd(model, X[:args.batch], Y[:args.batch], args.batch), nb)

    # ECIF, LoRA
    eng, h, pos, neg, info = ecif_stages(st, model, X, Y, Xv, Yv, args, None, "ECIF: ")
    total = pos + neg
    res["ecif"] = info

    # oracle
    if args.oracle_subset > 0:
        ks = oracle_subset(args.n, args.batch, args.oracle_subset)
        vals, touched = oracle(st, eng, h, ks)
        res["oracle"] = {"pairs": ks, "touched_batches": touched, "values": vals.tolist(),
                         "ecif": total[ks].tolist(), "rel_diff": rel_diff(vals, total[ks])}
        log(f"  oracle vs ECIF on {len(ks)} pairs: max rel. diff {res['oracle']['rel_diff']:.2e}")
    del eng
    gc.collect()

    # TRAK
    if args.trak:
        try:
            scores, tinfo = trak_scores(st, model, X, Y, Xv, Yv, args, lora)
        except ImportError as e:
            log(f"  TRAK skipped: {e}")
        else:
            s = scores.sum(1)
            tinfo.update(spearman=spearman(s, total), pearson=pearson(s, total),
                         spearman_positive=spearman(s, pos), pearson_positive=pearson(s, pos),
                         finite=bool(torch.isfinite(scores).all()))
            res["trak"] = tinfo
            log(f"  TRAK vs ECIF: Spearman {tinfo['spearman']:.3f}, Pearson {tinfo['pearson']:.3f} "
                f"(vs ECIF positive part: {tinfo['spearman_positive']:.3f} / {tinfo['pearson_positive']:.3f})")

    # heads only
    if args.heads:
        heads = heads_names(model)
        train_only(model, heads)
        st.run("heads: fwd+bwd (math SDPA)", fwd_bwd, model, X, Y, args.batch)
        _, _, _, _, hinfo = ecif_stages(st, model, X, Y, Xv, Yv, args, heads, "heads ECIF: ")
        res["heads"] = hinfo
        train_only(model, lora)

    st.run(BASE_END, fwd_bwd, model, X, Y, args.batch, ref=False)  # drift check on a shared machine
    res["stages"] = st.rows
    res["exact_peak"] = st.exact_peak
    res["influence"] = {"total": total.tolist(), "positive": pos.tolist(), "negative": neg.tolist()}
    res["machine"] = machine(load_start, os.getloadavg())
    res["wall_s"] = time.perf_counter() - t_start
    res["backend"] = registry.resolve("ecif_reductions", "cpu", None)[0]
    return res


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:  # not installed
        return "not installed"


def machine(load_start, load_end) -> dict:
    cpu = platform.processor() or "unknown"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        rev = "unknown"
    mem = float("nan")
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) / 2 ** 20
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": _version("transformers"), "peft": _version("peft"), "traker": _version("traker"),
            "python": platform.python_version(), "memory_gib": mem, "date": datetime.date.today().isoformat(),
            "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in load_end],
            "git": rev}


# ---------------------------------------------------------------------------------------------- report
def baseline(rows: dict, key: str = "s") -> float:
    """The reference forward+backward: the mean of the run at the start and the one at the end (when both)."""
    runs = [rows[k][key] for k in (BASE, BASE_END) if k in rows and key in rows[k]]
    return sum(runs) / len(runs)


def ratio(r: dict, base: float) -> float:
    """A stage's time over its adjacent forward+backward (over ``base`` where none was timed)."""
    return r["s"] / r["ref_s"] if "ref_s" in r else r["s"] / base


def render(res: dict, command: str) -> str:
    a, rows = res["args"], res["stages"]
    base = baseline(rows)
    adj = any("ref_s" in r for r in rows.values())
    e = res["ecif"]

    def busy(s, c):
        return f"{c / s:.1f}" if c is not None and s > 0 else ""

    def cells(s, c, rat, extra, peak, ref, b=""):
        return (f"{b}{s:.1f}{b} | {busy(s, c)} | " + (f"{b}{rat:.2f}×{b} | " if adj else "") +
                f"{s / ref:.2f}× | {extra:.0f} | {peak:.0f} |")

    def row(label, name, ref=base, baseline_row=False):
        r = rows[name]
        rat = ratio(r, ref)
        return f"| {label} | " + (cells(r["s"], r.get("cpu_s"), rat, r["extra_mib"], r["peak_mib"], ref)
                                  .replace(f"{rat:.2f}× | ", "— | ", 1 if baseline_row and adj else 0))

    def total_row(label, names, ref=base, bold=False):
        s = sum(rows[k]["s"] for k in names)
        c = sum(rows[k].get("cpu_s", float("nan")) for k in names)
        rat = sum(ratio(rows[k], ref) for k in names)
        peak = max(rows[k]["peak_mib"] for k in names)
        extra = max(rows[k]["extra_mib"] for k in names)
        return f"| {'**' if bold else ''}{label}{'**' if bold else ''} | " + cells(
            s, c, rat, extra, peak, ref, "**" if bold else ""), rat

    head = ["| stage | time (s) | threads busy | " + ("/ adjacent fwd+bwd | " if adj else "") +
            "/ run's fwd+bwd | extra peak (MiB) | peak RSS (MiB) |",
            "|---|---:|---:|---:|" + ("---:|" if adj else "") + "---:|---:|"]
    t = head + [row("**one forward+backward over the training set** (SDPA math kernel; the baseline"
                    + (", at the start" if BASE_END in rows else "") + ")", BASE, baseline_row=True)]
    if BASE_END in rows:
        t.append(row("**the same forward+backward, at the end of the run**", BASE_END, baseline_row=True))
    if "fwd+bwd (default SDPA)" in rows:
        t.append(row("forward+backward, default SDPA dispatch (what training would use; for reference)",
                     "fwd+bwd (default SDPA)", baseline_row=True))
    names = ["ECIF: fit", "ECIF: grad F", "ECIF: JVP pass", "ECIF: reductions"]
    t += [row("ECIF fit (embeddings of all pairs)", "ECIF: fit"),
          row(f"ECIF ∇F ({a['val']} validation pairs)", "ECIF: grad F"),
          row(f"ECIF solve: CG, {e['iterations']} iterations, Gauss–Newton on "
              f"{len(e['hessian_batches']) if e['hessian_batches'] else e['num_batches']} of {e['num_batches']} "
              "batches (the \"plus the solver\")", "ECIF: solve"),
          row("ECIF JVP pass (`_directions`)", "ECIF: JVP pass"),
          row("ECIF reductions (`ecif_reductions`)", "ECIF: reductions")]
    line, ecif_wo = total_row("ECIF total without the solve (target ≤ 4×)", names, bold=True)
    t.append(line)
    line, ecif_w = total_row("ECIF total with the solve", names + ["ECIF: solve"])
    t.append(line)
    out = {"ecif_wo": ecif_wo, "ecif_w": ecif_w, "base": base}
    o = res.get("oracle")
    if o:
        k, n, nb = len(o["pairs"]), a["n"], e["num_batches"]
        sh, pp = rows["oracle: ∇L_b of the touched batches"], rows["oracle: per pair (subset)"]
        f_sh, f_pp = nb / len(o["touched_batches"]), n / k
        est = sh["s"] * f_sh + pp["s"] * f_pp
        est_cpu = sh.get("cpu_s", float("nan")) * f_sh + pp.get("cpu_s", float("nan")) * f_pp
        rat = ratio(sh, base) * f_sh + ratio(pp, base) * f_pp
        t.append(f"| brute-force oracle, all {n} pairs (estimated: {k} pairs timed ×{f_pp:.0f}, "
                 f"∇L_b of {len(o['touched_batches'])} batches ×{f_sh:.0f}) | "
                 + cells(est, est_cpu, rat, max(sh["extra_mib"], pp["extra_mib"]),
                         max(sh["peak_mib"], pp["peak_mib"]), base))
        out["oracle"] = rat
    tr = res.get("trak")
    if tr:
        tn = ["TRAK: embedding pool", "TRAK: featurize", "TRAK: finalize features", "TRAK: score",
              "TRAK: finalize scores"]
        labels = ["TRAK embedding pool (`get_embeddings`, on CPU)",
                  "TRAK featurize (per-sample gradients + projection)",
                  "TRAK finalize features", f"TRAK score ({a['val']} validation pairs)", "TRAK finalize scores"]
        t += [row(lab, nm) for lab, nm in zip(labels, tn)]
        line, trak = total_row("TRAK total", tn, bold=True)
        t.append(line)
        out["trak"] = trak
    hd = res.get("heads")
    if hd:
        hb = rows["heads: fwd+bwd (math SDPA)"]["s"]
        hn = ["heads ECIF: fit", "heads ECIF: grad F", "heads ECIF: JVP pass", "heads ECIF: reductions"]
        t += ["", "Second table: the two projection heads instead of LoRA (P = "
              f"{hd['P']:,}; CG {hd['iterations']} iterations, CG's relative residual {hd['residual']:.2g}, δ = "
              f"{hd['damping']:.3g}); every ratio is to a heads-only forward+backward, which itself took "
              f"{hb / rows[BASE]['s']:.2f}× the LoRA one at the start of the run:", ""] + head
        t += [row("**one forward+backward** (backward to the heads only)", "heads: fwd+bwd (math SDPA)", hb,
                  baseline_row=True)]
        t += [row(f"ECIF {nm.split(': ')[1]}", nm, hb) for nm in hn[:2]]
        t += [row(f"ECIF solve (CG, {hd['iterations']} iterations)", "heads ECIF: solve", hb)]
        t += [row(f"ECIF {nm.split(': ')[1]}", nm, hb) for nm in hn[2:]]
        line, hwo = total_row("ECIF total without the solve", hn, hb, bold=True)
        t.append(line)
        out["heads_wo"], out["heads_base"] = hwo, hb
    res["_summary"] = out
    return "\n".join(t)


def describe(res: dict, command: str) -> str:
    a, m, e, rows = res["args"], res["machine"], res["ecif"], res["stages"]
    table = render(res, command)
    base = res["_summary"]["base"]
    sm = res["_summary"]
    size = ("ViT-B/32 size (`CLIPConfig()` defaults)" if a["layers"] == 12 and not a["tiny"] else
            f"{a['layers']} layers per tower (reduced for a quick run)")
    parts = [SECTION, "",
             f"`{command}` — {m['cpu']}, {m['cores']} cores (shared), `torch.set_num_threads({m['threads']})`, "
             f"{m['memory_gib']:.0f} GiB RAM, torch {m['torch']} (CPU), transformers {m['transformers']}, "
             f"peft {m['peft']}, traker {m['traker']}, Python {m['python']}, {m['date']}, ecif_fast at "
             f"`{m['git']}`. Load average (1, 5, 15 min) at start {m['load_start']}, at end {m['load_end']}; "
             f"the whole run took {res['wall_s'] / 60:.1f} min.", "",
             f"**Model:** a randomly initialised `transformers.CLIPModel`, {size}: vision 768 wide, patch 32, "
             f"224×224; text 512 wide, 32 tokens; projection 512; {res['n_params'] / 1e6:.1f} M parameters, float32, "
             f"`attn_implementation=\"sdpa\"`, through `ecif_fast.wrap`. **Parameters θ:** LoRA from `peft`, "
             f"r = {a['rank']} on `q_proj` and `v_proj` of both towers (P = {e['P']:,}), "
             "`init_lora_weights=False`: A and B both random (a fresh LoRA has B = 0, so every gradient and "
             "curvature direction in A would vanish and the benchmark would time a degenerate θ)"
             + ("; a second table uses the two projection heads instead." if res.get("heads") else
                "; the optional heads-only table was left out (`--no-heads`)."),
             "",
             f"**Data:** n = {a['n']} training pairs (random pixel values; random token ids, BOS + 14–30 ids + "
             f"EOS, padded with EOS to 32 — CLIP pools at the first EOS under a causal mask, so the padding is "
             f"inert), batch negatives with batch {a['batch']} ({e['num_batches']} batches), `negative_term="
             f"\"exact\"`; F = docs/math.md §2 contrastive loss of {a['val']} held-out pairs as one batch.",
             "",
             f"**Baseline** (1.00×): one forward+backward over the training set — the docs/math.md §2 loss of each "
             f"training batch, backward to θ, gradients accumulated batch by batch (one batch of activations "
             f"alive, as the engine's `chunk_size={a['chunk_size']}`), through the wrapper, i.e. under the SDPA "
             f"math kernel that the engine's JVP needs; timed in the same process, same threads, as everything "
             f"below, {_base_runs(rows)}. **On this shared 2-core machine other jobs come and go during a run**, "
             "and a 2-thread OpenMP run slows down far more than its share when one core is taken (each parallel "
             "region waits for the descheduled thread). So every stage below is also preceded by a forward+backward "
             "of one training batch, scaled by the number of batches: its *adjacent* baseline. **The ratios to "
             "read are the ones to the adjacent forward+backward**; the ratios to the run's (start/end mean) are "
             "shown beside them. *Threads busy* = process CPU time / wall time (2.0: both threads ran throughout; "
             "well below 2: another job held a core for part of that stage, and its wall time is inflated).",
             "",
             f"**ECIF** (`solver=\"cg\"`, `curvature=\"gauss-newton\"`, `chunk_size={a['chunk_size']}`, engine "
             f"defaults otherwise): the solve is matrix-free CG, **{e['iterations']} iterations** (fixed; CG's "
             f"relative "
             f"residual after them {e['residual']:.2g}), on the Gauss–Newton product subsampled to "
             f"{len(e['hessian_batches']) if e['hessian_batches'] else e['num_batches']} random training batch(es) "
             f"(`hessian_batches`), damping δ = {a['damping_fraction']:g}·tr(C)/P = {e['damping']:.3g} (tr(C) by "
             f"Hutchinson with {a['trace_probes']} probes on the same batches: {e['trace_s']:.1f} s of set-up, not "
             f"in the table). Reductions backend `{res['backend']}`. The solve is a cost measurement: after "
             f"{e['iterations']} float32 iterations h is not H⁻¹∇F (CG's residual is not monotone; a random-init "
             "ViT's subsampled Gauss–Newton matrix is badly conditioned at this damping; on a 1-layer model 10× "
             "the damping reached 3e-3 in 10 iterations). The oracle check is unaffected (both sides use the same "
             "h), and the influences are those of this h.",
             "",
             "**Memory:** per stage, in the same process: before each stage the script collects garbage, returns "
             "freed heap to the OS (`malloc_trim(0)`) and resets the kernel's resident high-water mark "
             "(`echo 5 > /proc/self/clear_refs`); *peak RSS* is `VmHWM` after the stage (exact, page-accounted, "
             "whole process: model, data and earlier results included), *extra peak* is that minus the "
             "resident set at the stage's start. The training pixels are 154 MiB, the model 0.6 GiB.",
             "", table, ""]
    ratio_wo = sm["ecif_wo"]

    def rr(name):
        return ratio(rows[name], base)

    bullets = [f"- **ECIF without the solve: {ratio_wo:.2f}× one forward+backward** "
               f"({'within' if ratio_wo <= 4 else 'above'} the ≤ 4× target); with the {e['iterations']}-iteration "
               f"solve {sm['ecif_w']:.2f}×. The JVP pass (forward-mode through both towers) is the largest "
               f"part, {rr('ECIF: JVP pass'):.2f}× one forward+backward; the fit (a forward without "
               f"graph) {rr('ECIF: fit'):.2f}×, ∇F (a forward+backward over the {a['val']} "
               f"validation pairs) {rr('ECIF: grad F'):.2f}×."
               + (f" The default SDPA dispatch (what training would use) ran the same forward+backward in "
                  f"{rows['fwd+bwd (default SDPA)']['s'] / rows[BASE]['s']:.2f}× the time of the math kernel's "
                  f"run just before it: measured against it, the ratios are "
                  f"{rows[BASE]['s'] / rows['fwd+bwd (default SDPA)']['s']:.2f}× these."
                  if "fwd+bwd (default SDPA)" in rows else ""),
               f"- **The solve** is the expensive part: {rows['ECIF: solve']['s'] / max(e['iterations'], 1):.1f} s "
               f"per CG iteration, i.e. {_per_iter(res):.1f}× a forward+backward of the same "
               f"{_hb_pairs(res)} pairs: `Curvature._gauss_newton` runs, per chunk, a forward with the JVP "
               f"(`embed_jvp`) and then a second forward with its graph for the VJP (`embed_vjp`), so each "
               f"product pays two forwards, a forward-mode pass and a backward.",
               f"- **Memory with `chunk_size={a['chunk_size']}`** stays at about one batch's forward+backward: the "
               f"largest ECIF stage is the solve's Gauss–Newton product, {rows['ECIF: solve']['extra_mib']:.0f} MiB "
               f"extra, {rows['ECIF: solve']['extra_mib'] / rows['ECIF: grad F']['extra_mib']:.1f}× ∇F's (one "
               f"forward+backward of {a['val']} pairs, {rows['ECIF: grad F']['extra_mib']:.0f} MiB); the JVP pass "
               f"needs {rows['ECIF: JVP pass']['extra_mib']:.0f} MiB (forward-mode keeps no activations), the fit "
               f"{rows['ECIF: fit']['extra_mib']:.0f} MiB. The baseline itself peaks at "
               f"{rows[BASE]['extra_mib']:.0f} MiB extra." + (
                   f" TRAK's featurize and score (per-sample gradients of a batch under `vmap`) peak at "
                   f"{rows['TRAK: featurize']['extra_mib']:.0f} and {rows['TRAK: score']['extra_mib']:.0f} MiB "
                   "extra." if "TRAK: featurize" in rows else "")
               + " How the engine's memory grows with batches, test sets and removed "
               "sets bigger than a chunk: the subsection below."]
    o = res.get("oracle")
    if o:
        bullets.append(
            f"- **Brute-force oracle** (`g_k = ∇L_b − ∇L_(b∖k)` by autograd through the whole model, "
            "batch-local, "
            f"dotted with the same h): {len(o['pairs'])} pairs timed ({o['pairs']}), `∇L_b` of their "
            f"{len(o['touched_batches'])} batches timed, both **scaled** to all {a['n']} pairs / "
            f"{e['num_batches']} batches: ≈ {sm['oracle']:.0f}× one forward+backward, "
            f"**{sm['oracle'] / sm['ecif_wo']:.0f}× ECIF without the solve**. Its values agree with ECIF's on "
            f"those pairs to max |Δ| / max |ECIF| = **{o['rel_diff']:.1e}** (float32).")
    tr = res.get("trak")
    if tr:
        bullets.append(
            f"- **TRAK** (traker {tr['version']}, `task=\"clip\"`, `CLIPModelOutput(simulated_batch_size="
            f"{tr['sim_batch']})`, `BasicProjector` (normal), proj_dim {a['proj_dim']}, float32, `lambda_reg=0`, "
            f"one checkpoint): {sm['trak']:.2f}× one forward+backward, {sm['trak'] / sm['ecif_wo']:.2f}× "
            f"ECIF without the solve. It differentiates the same {tr['P']:,} LoRA weights: traker's "
            "`FunctionalGradientComputer` takes per-sample gradients with respect to *every* named parameter and "
            f"drops the others afterwards ({res['n_params'] / 1e6:.0f} M × batch floats per featurize call here), "
            "so the benchmark passes "
            "the non-LoRA parameters to it as buffers (a 10-line subclass); the model is called as open_clip's "
            "`model(image=, text=) -> (u, v, t)`, and the negative pool of its `get_embeddings` step is computed "
            "on CPU (traker's own allocates with `.cuda()`). proj_dim < n because TRAK inverts XᵀX "
            f"(proj_dim × proj_dim) unregularised; with n = {a['n']} a proj_dim ≥ n makes it singular. Three "
            "traker 0.3.2 bugs are worked around in the script: `CLIPModelOutput.get_out_to_loss_grad` returns "
            "shape (B,) where the saver stores (B, 1) (featurize raises; its other tasks unsqueeze), "
            "`load_from_save_dir=False` leaves no `experiments.json` for scoring, and a projector of one block "
            "(proj_dim ≤ 100) has its matrix freed by `finalize_features` and not remade for `score`.")
        bullets.append(
            f"- **TRAK vs ECIF** (TRAK's per-train-pair score summed over the {a['val']} validation pairs, against "
            f"ECIF's influence on their loss; both are positive for a pair that helps, so no sign flip): Spearman "
            f"**{tr['spearman']:.2f}**, Pearson {tr['pearson']:.2f}; against ECIF's positive-role part alone "
            f"{tr['spearman_positive']:.2f} / {tr['pearson_positive']:.2f}. A sanity figure, not a target: TRAK "
            "is a different method — it treats the negatives as fixed (its margin uses a stored pool of "
            "embeddings, sampled per pair, so a pair's role as a negative for the others is absent), replaces "
            "the curvature by XᵀX of randomly projected per-sample gradients and weights by 1 − p; on a random-"
            "init model with random data the influences carry little structure for the methods to agree on.")
    hd = res.get("heads")
    if hd:
        bullets.append(
            f"- **Heads only** (second table): ECIF without the solve {sm['heads_wo']:.2f}× the "
            f"heads-only forward+backward. That baseline's backward stops at the heads, so it costs about one "
            f"forward ({sm['heads_base'] / rows[BASE]['s']:.2f}× the LoRA one), while every ECIF stage still runs "
            "both towers "
            f"forward for every pair (the fit, the JVP pass, and two per CG product).")
    parts += bullets
    return "\n".join(parts) + "\n"


def _base_runs(rows) -> str:
    runs = [rows[k]["s"] for k in (BASE, BASE_END) if k in rows]
    if len(runs) == 1:
        return f"it took **{runs[0]:.1f} s**"
    return (f"it took **{runs[0]:.1f} s** at the start of the run and **{runs[1]:.1f} s** at its end; the ratios "
            f"use the mean, {sum(runs) / 2:.1f} s")


def _hb_pairs(res) -> int:
    e, a = res["ecif"], res["args"]
    nb = len(e["hessian_batches"]) if e["hessian_batches"] else e["num_batches"]
    return min(nb * a["batch"], a["n"])


def _per_iter(res) -> float:
    """Seconds per CG iteration over the seconds of one forward+backward of the subsampled pairs."""
    e, rows = res["ecif"], res["stages"]
    per_pair = rows["ECIF: solve"].get("ref_s", baseline(rows)) / res["args"]["n"]
    return rows["ECIF: solve"]["s"] / max(e["iterations"], 1) / (per_pair * _hb_pairs(res))


# ---------------------------------------------------------------------------------------------- memory probe
def memory_probe(args, log=print) -> dict:
    """Extra peak memory of engine calls whose encoder calls may hold more than one chunk of activations, next
    to one chunk's forward+backward (run at reduced depth: activation memory is linear in the depth)."""
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    c, n = args.chunk_size, args.n
    model = ef.wrap(add_lora(build_clip(args.layers, args.seed, args.tiny), args.rank, args.seed))
    X, Y = make_pairs(n, args.seed + 2, args.tiny)
    Xv, Yv = make_pairs(n, args.seed + 3, args.tiny)
    fwd_bwd(model, X[:4], Y[:4], 4)  # warm-ups: first calls pay one-time start-up costs
    w = ef.ECIF(model, damping=1.0, batches=2, solver="cg", curvature="gauss-newton", cg_maxiter=1,
                chunk_size=4).fit(X[:4], Y[:4])
    w.curvature.matvec(torch.ones(w.space.size, 1))
    w.pair_gradients([0])
    w._test_gradients(Xv[:2], Yv[:2], None, False)
    del w
    common = dict(damping=1.0, solver="cg", curvature="gauss-newton", cg_maxiter=1, chunk_size=c)
    batch = ef.ECIF(model, batches=c, **common).fit(X, Y)
    whole = ef.ECIF(model, batches=None, **common).fit(X, Y)
    v = torch.randn(batch.space.size, 1, generator=torch.Generator().manual_seed(0))
    st = Stages(log)
    ops_ = [("fwd+bwd of one chunk (the unit)", lambda: fwd_bwd(model, X[:c], Y[:c], c)),
            (f"fwd+bwd of {n} pairs, one chunk at a time", lambda: fwd_bwd(model, X, Y, c)),
            (f"`_test_gradients` (∇F), {c} test pairs", lambda: batch._test_gradients(Xv[:c], Yv[:c], None, False)),
            (f"`_test_gradients` (∇F), {n} test pairs", lambda: batch._test_gradients(Xv, Yv, None, False)),
            (f"`curvature.matvec` (Gauss–Newton), batches of {c}", lambda: batch.curvature.matvec(v)),
            (f"`curvature.matvec` (Gauss–Newton), one batch of {n} (\"all\" negatives)",
             lambda: whole.curvature.matvec(v)),
            (f"`pair_gradients([0])`, batches of {c}", lambda: batch.pair_gradients([0])),
            (f"`pair_gradients([0])`, one batch of {n}", lambda: whole.pair_gradients([0])),
            (f"`group_gradient` of {n // c} pairs in {n // c} different batches of {c}",
             lambda: batch.group_gradient(list(range(0, n, c))))]
    for name, fn in ops_:
        st.run(name, fn)
    return {"args": vars(args).copy(), "rows": st.rows, "order": [o[0] for o in ops_],
            "machine": machine(load_start, os.getloadavg()), "wall_s": time.perf_counter() - t_start}


def describe_probe(res: dict, command: str, before: dict | None = None) -> str:
    """The probe's subsection; ``before``: the same probe at an earlier commit, shown beside it."""
    a, rows, m = res["args"], res["rows"], res["machine"]
    o = res["order"]
    unit = rows[o[0]]["extra_mib"]
    c, n = a["chunk_size"], a["n"]
    b_rows = before["rows"] if before else None
    b_unit = b_rows[o[0]]["extra_mib"] if before else None
    lines = [PROBE, "",
             f"`{command}` — same machine, {m['date']}, load average at start {m['load_start']}, at end "
             f"{m['load_end']}; ecif_fast at `{m['git']}`. The same LoRA model at **{a['layers']} layers per tower** "
             f"(activation memory grows linearly with the depth), `chunk_size={c}`, n = {n}; each call once, extra "
             "peak RSS as above (times taken under that load; the memory figures do not depend on it). The "
             "question: does a call hold more than one chunk's activations when its batch, its test set or its "
             "set of removed pairs is bigger than a chunk?"
             + (f" Beside it, the same probe at `{before['machine']['git']}` (engine before its commit "
                "\"memory bounded by one chunk also inside big batches and test sets\")." if before else ""), "",
             "| call | time (s) | extra peak (MiB) | × one chunk's fwd+bwd |"
             + (" before: extra peak (MiB) | before: × one chunk |" if before else ""),
             "|---|---:|---:|---:|" + ("---:|---:|" if before else "")]
    for name in o:
        r = rows[name]
        line = f"| {name} | {r['s']:.1f} | {r['extra_mib']:.0f} | {r['extra_mib'] / unit:.1f} |"
        if before and name in b_rows:
            line += f" {b_rows[name]['extra_mib']:.0f} | {b_rows[name]['extra_mib'] / b_unit:.1f} |"
        elif before:
            line += " | |"
        lines.append(line)

    def grows(big, small, r=rows):
        return r[o[big]]["extra_mib"] / r[o[small]]["extra_mib"]

    checks = [(f"∇F of {n} test pairs vs {c} (`_test_gradients`)", 3, 2),
              (f"a Gauss–Newton product with one batch of {n} (\"all\" negatives) vs batches of {c}", 5, 4),
              (f"`pair_gradients` of one pair in a batch of {n} vs of {c}", 7, 6),
              (f"`group_gradient` over {n // c} batches vs `pair_gradients` in one", 8, 6)]
    lines += ["", f"Growth of the extra peak when {n // c}× more pairs are involved (1.0: bounded by one chunk; "
              f"about {n // c}: all of them held at once):"]
    for label, big, small in checks:
        g = grows(big, small)
        txt = f"- {label}: **×{g:.1f}**"
        if before:
            txt += f" (before: ×{grows(big, small, b_rows):.1f})"
        lines.append(txt + ".")
    lines += [f"- For scale: the forward+backward over all {n} pairs one chunk at a time (bounded by construction) "
              f"peaks at ×{rows[o[1]]['extra_mib'] / unit:.1f} the single chunk's.",
              f"- At this depth fixed costs weigh more than at 12 layers: one Gauss–Newton product over chunks "
              f"of {c} peaks at {rows[o[4]]['extra_mib'] / unit:.1f}× a chunk's forward+backward here, while in "
              "the full-depth run above it stays near one batch's forward+backward."]
    return "\n".join(lines) + "\n"


def write_section(text: str, path: str = os.path.join(ROOT, "BENCHMARKS.md"), probe: bool = False) -> None:
    """Replace this benchmark's section (``probe``: only its memory-probe subsection, which a rewrite of the
    main section keeps)."""
    body = read_section(SECTION, path)
    if not body:
        body = text
    else:
        old = body[body.index(PROBE):] if PROBE in body else ""
        if probe:
            body = body[:len(body) - len(old)] if old else body
            body = body.rstrip("\n") + "\n\n" + text
        else:
            body = text + ("\n" + old.rstrip("\n") + "\n" if old else "")
    write_section_in(SECTION, body, path)


# ---------------------------------------------------------------------------------------------- pytest-benchmark
try:
    import pytest
except ImportError:  # script mode without pytest
    pytest = None

if pytest is not None:

    def _tiny_args(**kw):
        args = parse([]).__dict__
        args.update(tiny=True, layers=1, n=16, batch=8, val=8, chunk_size=8, hessian_batches=1, cg_iters=5,
                    oracle_subset=4, proj_dim=8, threads=torch.get_num_threads(), sdpa_reference=False,
                    heads=False, trak=False)
        args.update(kw)
        return argparse.Namespace(**args)

    def test_clip_tiny_influence(benchmark):
        """Tiny CLIP + LoRA: ECIF stages (benchmarked: the JVP pass + reductions) agree with the oracle."""
        args = _tiny_args()
        clip = build_clip(1, 0, tiny=True)
        model = ef.wrap(add_lora(clip, 2, 0))
        X, Y = make_pairs(args.n, 2, True)
        Xv, Yv = make_pairs(args.val, 3, True)
        st = Stages(log=lambda *_: None)
        eng, h, pos, neg, _ = ecif_stages(st, model, X, Y, Xv, Yv, args, None, "")

        def influence():
            dU, dV, ds = eng._directions(h[:, None])
            p, q = ops.ecif_reductions(eng.U, eng.V, eng.log_scale.exp(), eng.plan, dU, dV, ds, eng.negative_term)
            return (p + q)[0]

        total = benchmark.pedantic(influence, rounds=3, warmup_rounds=1)
        ks = oracle_subset(args.n, args.batch, args.oracle_subset)
        vals, _ = oracle(st, eng, h, ks)
        assert rel_diff(vals, total[ks]) < 1e-3
        benchmark.extra_info.update(n=args.n, P=eng.space.size)


# ---------------------------------------------------------------------------------------------- script mode
def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=256, help="training pairs")
    p.add_argument("--batch", type=int, default=64, help="training batch size (batch negatives)")
    p.add_argument("--val", type=int, default=64, help="validation pairs (F = their contrastive loss)")
    p.add_argument("--layers", type=int, default=12, help="transformer layers per tower (12 = ViT-B/32)")
    p.add_argument("--tiny", action="store_true", help="tiny widths (the pytest-benchmark size)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--chunk-size", type=int, default=64, help="ECIF chunk_size (pairs per encoder call)")
    p.add_argument("--cg-iters", type=int, default=10)
    p.add_argument("--hessian-batches", type=int, default=1, help="batches in the curvature subsample")
    p.add_argument("--damping-fraction", type=float, default=1.0,
                   help="δ = this × tr(C)/P (the mean eigenvalue of the subsampled Gauss–Newton matrix)")
    p.add_argument("--trace-probes", type=int, default=2, help="Hutchinson probes for tr(C)")
    p.add_argument("--oracle-subset", type=int, default=8, help="pairs timed for the oracle (0: skip)")
    p.add_argument("--proj-dim", type=int, default=128, help="TRAK projection dimension")
    p.add_argument("--no-trak", dest="trak", action="store_false")
    p.add_argument("--no-heads", dest="heads", action="store_false", help="skip the heads-only row")
    p.add_argument("--no-sdpa-reference", dest="sdpa_reference", action="store_false",
                   help="skip the fwd+bwd with the default SDPA kernel")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also save the raw results here")
    p.add_argument("--from-json", default=None, help="render saved results instead of running")
    p.add_argument("--memory-probe", action="store_true",
                   help="instead: peak memory of engine calls that may hold more than one chunk of activations")
    p.add_argument("--before-json", default=None,
                   help="with --memory-probe: saved probe results of an earlier commit, shown beside")
    p.add_argument("--write", action="store_true", help="rewrite this section of BENCHMARKS.md")
    return p.parse_args(argv)


def _public(argv):
    """The arguments that reproduce the numbers (without ``--json FILE``, where the raw results went)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--json":
            skip = True
        elif not x.startswith("--json="):
            out.append(x)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    if args.memory_probe:
        if args.from_json:
            with open(args.from_json) as f:
                res = json.load(f)
            command = res.get("command") or " ".join(["python benchmarks/bench_clip_scale.py --memory-probe"] + [
                f"--{k.replace('_', '-')} {res['args'][k]}" for k in ("layers", "n", "chunk_size")])
        else:
            command = " ".join(["python benchmarks/bench_clip_scale.py"] + _public(argv))
            res = memory_probe(args)
            res["command"] = command
        before = None
        if args.before_json:
            with open(args.before_json) as f:
                before = json.load(f)
        text = describe_probe(res, command, before)
        print(text)
        if args.json and not args.from_json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
        if args.write:
            write_section(text, probe=True)
        return
    if args.from_json:
        with open(args.from_json) as f:
            res = json.load(f)
        command = res["command"]
    else:
        command = " ".join(["python benchmarks/bench_clip_scale.py"] + _public(argv))
        res = run(args)
        res["command"] = command
        if args.json:
            with open(args.json, "w") as f:
                json.dump({k: v for k, v in res.items() if not k.startswith("_")}, f, indent=1)
    text = describe(res, command)
    print(text)
    if args.write:
        write_section(text)
        print(f"wrote the section {SECTION!r} of BENCHMARKS.md")


if __name__ == "__main__":
    main()

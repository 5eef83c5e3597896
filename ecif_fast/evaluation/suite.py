"""The evaluation suite: every experiment of one mode (``quick`` for CI, ``full`` for EVALUATION.md) → one dict."""
from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import ablations, cleaning, detection, fidelity, runtime
from .digits import DigitSetting, digit_run
from .problems import linear_normalized, linear_plain


@dataclass(frozen=True)
class Mode:
    name: str
    loo: dict                      # problem -> LOO pairs (None = all)
    lds: dict                      # problem -> LDS subsets (0 = no LDS)
    noise_levels: tuple
    main_noise: float
    seeds: tuple
    cleaning_kinds: tuple
    cleaning_seeds: tuple
    batch_sizes_loo: tuple
    detection_dampings: tuple
    detection_batches: tuple
    scaling_sizes: tuple
    runtime_repeats: int
    n_boot: int = 1000
    digits: DigitSetting = field(default_factory=DigitSetting)


QUICK = Mode("quick", loo={"linear_plain": 40, "linear_normalized": 30, "clip_lora": 16},
             lds={"linear_plain": 50, "linear_normalized": 0, "clip_lora": 0}, noise_levels=(0.2,), main_noise=0.2,
             seeds=(0, 1), cleaning_kinds=("next_digit",), cleaning_seeds=(0,), batch_sizes_loo=(10, 50),
             detection_dampings=(), detection_batches=(), scaling_sizes=(1000, 2000, 4000), runtime_repeats=1,
             n_boot=300)
FULL = Mode("full", loo={"linear_plain": None, "linear_normalized": None, "clip_lora": None},
            lds={"linear_plain": 100, "linear_normalized": 50, "clip_lora": 50}, noise_levels=(0.1, 0.2, 0.3),
            main_noise=0.2, seeds=(0, 1, 2, 3, 4), cleaning_kinds=("next_digit", "uniform"), cleaning_seeds=(0, 1, 2),
            batch_sizes_loo=(10, 25, 50, 100), detection_dampings=(3, 10, 30, 100, 300),
            detection_batches=(16, 64, 256), scaling_sizes=(1000, 2000, 4000, 8000, 16000, 32000),
            runtime_repeats=3)
MODES = {"quick": QUICK, "full": FULL}

# the normalised problem (b): δ = 10 is the smallest damping at which every half-subset retrain reaches an optimum
# (δ = 0.3 / 1 / 3: Newton stalls on some subsets as embeddings approach zero norm, docs/math.md §6 practical notes)
NORMALIZED_DAMPING = 10.0


def machine() -> dict:
    mem = None
    try:
        with open("/proc/meminfo") as f:
            mem = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": mem, "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform()}


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in ("ecif-fast", "torch", "traker", "dattri", "kronfluence", "transformers", "peft"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def run(mode: Mode, *, progress: bool = True, log=print) -> dict:
    t_start = time.perf_counter()
    from ecif_fast.demo.data import load_digit_captions

    from .lora_problem import clip_lora

    out: dict = {"mode": mode.name, "machine": machine(), "versions": _versions(), "seconds": {}}
    stage = {}

    def timed(name):
        stage["name"], stage["t0"] = name, time.perf_counter()
        log(f"[{time.strftime('%H:%M:%S')}] {name} ...")

    def done():
        out["seconds"][stage["name"]] = time.perf_counter() - stage["t0"]

    # ---- 1. fidelity
    timed("fidelity")
    digits_small = load_digit_captions(8, 8)
    builders = {"linear_plain": lambda: linear_plain(),
                "linear_normalized": lambda: linear_normalized(digits_small, damping=NORMALIZED_DAMPING),
                "clip_lora": lambda: clip_lora()}
    out["fidelity"], problems = {}, {}
    for name, build in builders.items():
        problems[name] = p = build()
        out["fidelity"][name] = fidelity.run_fidelity(p, n_loo=mode.loo[name], n_subsets=mode.lds[name], seed=0,
                                                      n_boot=mode.n_boot, progress=progress)
        loo = out["fidelity"][name]["loo"]
        log(f"  {name}: LOO Pearson ECIF {loo['ecif']['pearson']:.3f}, Taylor {loo['ecif_taylor']['pearson']:.3f}, "
            f"positive-only {loo['positive_only']['pearson']:.3f}, TracIn {loo['tracin']['pearson']:.3f}, "
            f"TRAK {loo['trak']['pearson']:.3f}")
    done()

    # ---- 4a. ablations on (a)
    timed("ablations")
    pa = problems["linear_plain"]
    fa = out["fidelity"]["linear_plain"]
    pairs, actual = _loo_of(fa)
    out["ablations"] = {"problem": pa.description,
                        "roles": {name: ablations.roles(p, *_loo_of(out["fidelity"][name]))
                                  for name, p in problems.items()},
                        "damping_loo": ablations.damping_sweep(pa, pairs, actual),
                        "batch_size_loo": ablations.batch_sweep(mode.batch_sizes_loo, 20, 0, progress),
                        "solver": ablations.solver_sweep(pa, pairs, actual)}
    done()

    # ---- 2. detection
    timed("detection")
    data = load_digit_captions(mode.digits.image_dim, mode.digits.text_dim)
    per_level, cross = {}, {}
    runs = [(noise, seed) for noise in mode.noise_levels for seed in mode.seeds]
    main_run = None
    for noise, seed in tqdm(runs, desc="detection runs", disable=not progress):
        r = digit_run(data, mode.digits, noise, seed)
        scores, secs = detection.detection_scores(r.problem, seed=seed)
        per_level.setdefault(noise, []).append(detection.detection_metrics_of(scores, r.problem.misaligned))
        if seed == mode.seeds[0]:
            from .peers import dattri_positive_only

            dat, t_dat, det_d = dattri_positive_only(r.problem)
            cross[f"{noise:.0%}"] = {"max_rel_diff": det_d["max_rel_diff"],
                                     "pearson_vs_positive": det_d.get("pearson_positive"),
                                     "seconds_dattri": t_dat, "n": r.problem.n}
            if noise == mode.main_noise:
                main_run = r
    by_noise = {f"{n:.0%}": detection.summarise(v) for n, v in per_level.items()}
    out["detection"] = by_noise[f"{mode.main_noise:.0%}"]
    out["detection_by_noise"] = by_noise
    out["detection_setup"] = {"noise_levels": list(mode.noise_levels), "main_noise": mode.main_noise,
                              "seeds": list(mode.seeds), "n_train": mode.digits.n_train, "n_val": mode.digits.n_val,
                              "batch_size": mode.digits.batch_size, "damping": mode.digits.damping}
    out["dattri_cross_check"] = cross
    m = out["detection"]
    log(f"  AUROC at {mode.main_noise:.0%}: ECIF-self {m['ecif_self']['auroc']:.3f}, ECIF-validation "
        f"{m['ecif']['auroc']:.3f}, positive-only {m['positive_only']['auroc']:.3f} / self "
        f"{m['positive_only_self']['auroc']:.3f}, CLIP-score {m['clip_score']['auroc']:.3f}")
    if mode.detection_dampings or mode.detection_batches:
        out["ablations"]["detection"] = ablations.detection_sweeps(
            data, mode.digits, mode.main_noise, mode.seeds[0], mode.detection_dampings, mode.detection_batches)
    done()

    # ---- 3. cleaning
    timed("cleaning")
    out["cleaning"] = {}
    for kind in mode.cleaning_kinds:
        rows = []
        for seed in mode.cleaning_seeds:
            r = digit_run(data, mode.digits, 0.3, seed, kind)
            scores, _ = detection.detection_scores(r.problem, seed=seed)
            rows.append(cleaning.cleaning(r, scores, seed=seed))
        out["cleaning"][kind] = _mean_cleaning(rows)
        c = out["cleaning"][kind]["accuracy"]
        log(f"  cleaning ({kind}, 30%): none {c['none']['mean']:.3f}, ECIF {c['ecif']['mean']:.3f}, "
            f"random {c['random']['mean']:.3f}, true {c['true_misaligned']['mean']:.3f}")
    done()

    # ---- 5. runtime
    timed("runtime")
    out["runtime_s"] = runtime.peer_runtimes(main_run.problem, repeats=mode.runtime_repeats)
    out["runtime_problem"] = main_run.problem.description + f", n={main_run.problem.n}, P=512"
    out["runtime_small_s"] = runtime.peer_runtimes(pa, repeats=mode.runtime_repeats)
    out["scaling"] = runtime.scaling(mode.scaling_sizes)
    log(f"  ECIF time ~ n^{out['scaling']['exponent_fit_plus_influence']:.2f}")
    done()
    out["seconds"]["total"] = time.perf_counter() - t_start
    return out


def _loo_of(fid):
    """``(pairs, actual)`` of a fidelity result: the LOO pairs and their measured ``ΔF``."""
    return torch.tensor(fid["loo_pair_ids"]), torch.tensor(fid["loo_actual"], dtype=torch.float64)


def _mean_cleaning(rows: list[dict]) -> dict:
    def agg(key):
        return {m: {"mean": float(np.mean([r[key][m] for r in rows])),
                    "std": float(np.std([r[key][m] for r in rows], ddof=1)) if len(rows) > 1 else 0.0}
                for m in rows[0][key]}

    upd = {k: float(np.mean([r["ecif_update"][k] for r in rows])) for k in
           ("accuracy", "seconds", "retrain_accuracy", "retrain_seconds")}
    from .detection import summarise

    return {"removed": rows[0]["removed"], "seeds": len(rows), "accuracy": agg("accuracy"),
            "detection": summarise([r["detection"] for r in rows]),
            "removed_misaligned": agg("removed_misaligned"), "retrain_seconds": agg("retrain_seconds"),
            "ecif_update": {"scoring": rows[0]["ecif_update"]["scoring"], **upd}, "per_seed": rows}

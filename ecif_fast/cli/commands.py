"""One function per ``ecif-fast`` subcommand. Each takes the parsed arguments and a :class:`Console` and
returns ``{"command", "summary", "out", "files", "text"}`` (``text``: lines for the terminal), or None
when the command printed its own output (``demo``).

The analysis commands (value, detect, trace, clean) load every input first, so that a bad file fails
before any computation, fit :class:`~ecif_fast.ECIF` with the checkpoint's batches and damping (the
curvature of the objective the heads were trained on), and write their folder atomically.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from .. import ECIF, LinearHeads, train as train_heads
from ..apps.detection import CLEAN_FRACTION, CLEAN_ROUNDS
from ..rank_selection import choose_rank
from ..training import NEWTON_MEMORY_LIMIT, newton_bytes, objective
from ..apps import (SCORING_METHODS, clean as clean_pairs, detect_misaligned, trace_back, value_data, zero_shot_logits,
                    zero_shot_losses)
from .checkpoint import save_checkpoint, trained_vector
from .data_files import DataFileError, PairsData, ids_to_indices, load_ids, load_pairs
from .session import (Console, Setup, UsageError, batch_arg, check_negatives, plain_ids, command_result, check_out,
                      image_ref, pairs_loss, setup, write_outputs)

DEFAULT_BATCH = 256       # train: pairs per batch when neither --batch-size nor a batch_ids column is given
GALLERY = 24              # detect: flagged pairs shown in the report
PANELS = 30               # trace: test examples shown in the report


# ============================================================================================== demo

def demo(args, con: Console):
    """Forward to :func:`ecif_fast.demo.run_demo` (embedded real digits + MiniLM captions, report folder)."""
    check_out(args)
    from ..demo import run_demo

    run_demo(out=args.out, seed=args.seed, backend=args.backend, quick=args.quick, progress=con.verbose,
             json_out=args.json, overwrite=args.force)
    return None


# ============================================================================================= train

#: ``train`` warns when max|∇R| ends above this: not at the optimum the influence formulas assume.
GRAD_TOL = {torch.float64: 1e-5, torch.float32: 1e-2}


def train(args, con: Console) -> dict:
    """Fit LinearHeads on a training file; write the checkpoint."""
    check_out(args, is_file=True)
    data = load_pairs(args.train)
    dtype = torch.float32 if args.float32 else torch.float64
    di, dt = data.images.shape[1], data.texts.shape[1]
    if args.no_whiten and args.rank is not None:
        raise UsageError("--rank sets how many whitened dimensions are kept; it cannot go with --no-whiten")
    rank = None if args.no_whiten else args.rank or "auto"
    embed = args.embed_dim or min(64, di, dt, rank if isinstance(rank, int) else di)
    if args.batch_size is not None:
        batches, record = batch_arg(args.batch_size), {"batch_size": batch_arg(args.batch_size)}
        desc = f"size {args.batch_size}"
    elif data.batch_ids is not None:
        batches = torch.from_numpy(data.batch_ids)
        record, desc = {"batch_ids": batches}, f"{len(np.unique(data.batch_ids))} batches (batch_ids)"
    else:
        batches, record, desc = DEFAULT_BATCH, {"batch_size": DEFAULT_BATCH}, f"size {DEFAULT_BATCH}"
    check_negatives(batches, data.n, "--batch-size" if args.batch_size is not None else str(args.train))
    if args.batch_size is not None and data.batch_ids is not None:
        con.warn(f"--batch-size {args.batch_size} is used; the batch_ids column of {args.train} is ignored")
    torch.manual_seed(args.seed)
    heads_args = {"normalize": not args.no_normalize, "logit_scale": args.logit_scale,
                  "train_scale": args.train_scale}
    tried = None
    if rank == "auto":   # the rank of least approximate leave-one-out loss (docs/math.md §2.4)
        with con.steps(1) as step:
            step("choosing the rank by held-out loss")
            t0 = time.perf_counter()
            choice = choose_rank(data.images.to(dtype), data.texts.to(dtype), batches=batches,
                                 damping=args.damping, embed_dim=args.embed_dim, max_embed=min(64, di, dt),
                                 soft_norm=args.soft_norm, method=args.method, max_iter=args.max_iter,
                                 seed=args.seed, on_rank=lambda e: step.describe(
                                     f"choosing the rank by held-out loss (rank {e['rank']}: {e['held_out_loss']:.4g})"),
                                 **heads_args)
            secs = time.perf_counter() - t0
        model, res, theta_ref, tried, chosen = choice.model, choice.result, choice.theta_ref, choice.tried, choice.rank
        embed = model.image_proj.out_features
    else:
        if args.no_whiten:
            model = LinearHeads(di, dt, embed, **heads_args).to(dtype)
        else:   # whitened features, started at the canonical correlation directions (docs/math.md §2.1)
            model = LinearHeads.from_features(data.images.double(), data.texts.double(), embed,
                                              max_rank=None if rank == "full" else rank, soft_norm=args.soft_norm,
                                              **heads_args).to(dtype)
        theta_ref = trained_vector(model).clone()    # weight decay pulls towards the initialisation
        with con.steps(1) as step:
            step(f"training ({args.method})")
            t0 = time.perf_counter()
            res = train_heads(model, data.images.to(dtype), data.texts.to(dtype), batches=batches,
                              damping=args.damping, theta_ref=theta_ref, method=args.method, max_iter=args.max_iter)
            secs = time.perf_counter() - t0
    training = {"damping": float(args.damping), **record, "theta_ref": theta_ref, "loss": res.loss,
                "grad_norm": res.grad_norm, "iterations": res.iterations, "method": args.method,
                "max_iter": args.max_iter, "n_train": data.n, "fingerprint": data.fingerprint()}
    if tried is not None:
        training["rank_selection"] = tried
    path = save_checkpoint(args.out, model, training)
    if res.grad_norm > GRAD_TOL[dtype]:
        P = int(theta_ref.numel())
        advice = ("raise --max-iter or use --method newton" if newton_bytes(P, dtype) <= NEWTON_MEMORY_LIMIT else
                  f"raise --max-iter, standardise the features, or lower --embed-dim (--method newton needs "
                  f"{newton_bytes(P, dtype) / 2 ** 30:.1f} GiB for P = {P})")
        collapsed = _collapsed_embedding(model, data, dtype)
        if collapsed:
            advice = (f"{collapsed}: the optimum sits where the normalisation is singular (docs/math.md §2.1); "
                      "raise --damping, or --soft-norm above 0")
        con.warn(f"training stopped with max|grad R| = {res.grad_norm:.3g} after {res.iterations} iterations, "
                 f"not at the optimum the influence formulas assume; {advice}")
    summary = {"checkpoint": str(path), "n_train": data.n, "image_dim": di, "text_dim": dt, "embed_dim": embed,
               "parameters": int(theta_ref.numel()), "whitened": not args.no_whiten,
               "ranks": None if args.no_whiten else [model.image_rank, model.text_rank],
               "norm_eps": float(model.norm_eps), "batches": desc, "damping": float(args.damping),
               "method": args.method, "loss": res.loss, "grad_norm": res.grad_norm, "iterations": res.iterations,
               "dtype": str(dtype).replace("torch.", ""), "seconds": secs}
    whiten = "" if args.no_whiten else f" (whitened to {model.image_rank}+{model.text_rank})"
    text = [f"trained LinearHeads {di}+{dt}{whiten} -> {embed} on {data.n} pairs ({desc}): loss {res.loss:.6g}, "
            f"max|grad| {res.grad_norm:.3g}, {res.iterations} iterations, {secs:.1f} s"]
    if tried is not None:
        summary["rank_selection"] = tried
        text.append(f"rank {chosen} of least held-out loss among "
                    + ", ".join(f"{e['rank']}: {e['held_out_loss']:.5g}" for e in tried))
    text.append(f"wrote {path}")
    return {"command": "train", "out": str(path), "files": {path.name: str(path)}, "summary": summary, "text": text}


#: ``train`` names an embedding whose pre-normalisation norm fell below this part of the median.
COLLAPSE_RATIO = 1e-3


def _collapsed_embedding(model, data, dtype) -> str | None:
    """For exactly normalised heads: which pair's image or text embedding has a pre-normalisation norm ``|W x|``
    below :data:`COLLAPSE_RATIO` × the median of its side (the drift to zero of docs/math.md §2.1), else None."""
    if not model.scale_invariant:
        return None
    with torch.no_grad():
        for side, Z in (("image", data.images), ("text", data.texts)):
            proj = model.image_proj if side == "image" else model.text_proj
            z = proj(model.proj_input(Z.to(dtype), side)).norm(dim=1)
            k = int(z.argmin())
            if float(z[k]) < COLLAPSE_RATIO * float(z.median()):
                return (f"the {side} embedding of pair {k} has norm {float(z[k]):.2g} before normalisation "
                        f"(median {float(z.median()):.2g})")
    return None


# ============================================================================================= value

def value(args, con: Console) -> dict:
    """Influence of every training pair on the validation loss, split into its two roles."""
    with con.steps(3) as step:
        step("loading")
        s = setup(args, con)
        val = s.pairs(args.val)
        step("fitting ECIF")
        ecif = s.fit(con)
        step("influence")
        table = value_data(ecif, s.t(val.images), s.t(val.texts), info=s.train.info())
    order = np.argsort(table["total"].to_numpy(), kind="stable")
    harmful = int((table["total"] < 0).sum())
    summary = {"command": "value", "val": str(args.val), "n_val": val.n,
               "validation_loss": pairs_loss(s.model, s.t(val.images), s.t(val.texts)),
               "harmful_pairs": harmful, "most_harmful": plain_ids(table["pair_id"].to_numpy()[order[:10]]),
               "most_valuable": plain_ids(table["pair_id"].to_numpy()[order[::-1][:10]]), "settings": s.settings}
    report = {"title": "ecif-fast value: data valuation", "summary": summary,
              "subtitle": f"{s.train.n} training pairs scored against {val.n} validation pairs ({args.val})",
              "headline": [("training pairs", s.train.n), ("harmful (total < 0)", harmful),
                           ("validation loss F", summary["validation_loss"])],
              "notes": ["total = predicted change of the validation loss F when the pair is removed: > 0 the "
                        "pair is valuable, < 0 harmful. positive = its own loss term, negative = its role as a "
                        "negative in other anchors' softmax."],
              "tables": {"Most harmful pairs": table.iloc[order[:20]],
                         "Most valuable pairs": table.iloc[order[::-1][:20]]}}
    files = write_outputs(args, report, {"scores": table})
    return command_result("value", args, summary, files,
                   [f"{harmful} of {s.train.n} pairs are harmful (removing them lowers the validation loss)"])


# ============================================================================================ detect

def detect(args, con: Console) -> dict:
    """Rank training pairs by how likely they are misaligned; metrics when a ``misaligned`` column exists."""
    scoring = args.scoring or "cleaned"
    if scoring in ("validation", "combined") and not args.val:
        raise UsageError(f"--scoring {scoring} needs trusted validation pairs: pass --val FILE, or use "
                         "--scoring cleaned (the default) or self")
    with con.steps(3) as step:
        step("loading")
        s = setup(args, con)
        val = s.pairs(args.val) if args.val else None
        step("fitting ECIF")
        ecif = s.fit(con)
        step(f"scoring ({scoring})")
        # with --val the validation influence is a second column whatever the primary scoring
        wanted = [scoring] + (["validation"] if val and scoring not in ("validation", "combined") else [])
        det = detect_misaligned(ecif, s.t(val.images) if val else None, s.t(val.texts) if val else None,
                                scoring=wanted, labels=s.train.misaligned, info=s.train.info(with_misaligned=False))
        s.finish(ecif, con)
    labels = s.train.misaligned
    primary = SCORING_METHODS[scoring]
    top = det.top(GALLERY)
    summary = {"command": "detect", "scoring": scoring, "val": str(args.val) if val else None,
               "top_flagged": plain_ids(top["pair_id"].to_numpy()[:10]), "metrics": det.metrics, "settings": s.settings}
    headline = [("training pairs", s.train.n), ("scoring", scoring)]
    section = {"gallery": _gallery(top, s.train, labels is not None)}
    tables = {"scores": det.table}
    text = [f"scored {s.train.n} pairs ({scoring}); most suspicious: {summary['top_flagged'][:5]}"]
    if det.metrics is not None:
        import pandas as pd

        metrics = pd.DataFrame.from_dict(det.metrics, orient="index")
        metrics.index.name = "method"
        tables["metrics"] = metrics
        section.update(curves={m: (v, labels) for m, v in det.scores.items()}, metrics=metrics, labels=labels)
        m = det.metrics[primary]
        summary.update(auroc=m["auroc"], average_precision=m["average_precision"],
                       precision_at_k=m["precision_at_k"], k=m["k"])
        headline += [("AUROC", m["auroc"]), ("average precision", m["average_precision"]),
                     (f"precision@{m['k']}", m["precision_at_k"])]
        text.append(f"misaligned column: AUROC {m['auroc']:.3f}, AP {m['average_precision']:.3f}, "
                    f"precision@{m['k']} {m['precision_at_k']:.3f}")
    if "positive" in det.table:
        section.update(positive=det.table["positive"].to_numpy(), negative=det.table["negative"].to_numpy())
    report = {"title": "ecif-fast detect: misaligned pairs", "summary": summary, "headline": headline,
              "subtitle": f"{s.train.n} training pairs ({args.train}), scoring {scoring}",
              "notes": ["score: higher = more suspicious. cleaned: the pair's loss after the most suspicious "
                        f"{CLEAN_FRACTION:.0%} are removed by the closed-form update, {CLEAN_ROUNDS} rounds; "
                        "validation: minus the influence on the validation loss; self: self-influence g'H^-1 g; "
                        "combined: mean percentile rank of validation and self."],
              "detection": {f"{scoring} scoring": section}}
    files = write_outputs(args, report, tables)
    return command_result("detect", args, summary, files, text)


def _gallery(top, data: PairsData, with_labels: bool) -> list[dict]:
    items = []
    for row in top.to_dict("records"):
        scores = {k: row[k] for k in ("score", "positive", "negative") if k in row}
        items.append({"pair_id": row["pair_id"], "caption": row.get("caption"),
                      "image": image_ref(row.get("image_path"), data.path),
                      "misaligned": bool(row["misaligned"]) if with_labels else None, "scores": scores})
    return items


# ============================================================================================= trace

def trace(args, con: Console) -> dict:
    """Top-k training pairs behind each test pair's loss, or behind each zero-shot prediction."""
    if args.only_wrong and not args.classes:
        raise UsageError("--only-wrong needs zero-shot trace-back: pass --classes FILE")
    zero_shot = args.classes is not None
    with con.steps(3) as step:
        step("loading")
        s = setup(args, con)
        test = s.pairs(args.test, need_texts=not zero_shot,
                       hint="; or give --classes FILE to trace zero-shot predictions of the test images")
        extra, test_names = {}, None
        if zero_shot:
            classes = s.classes(args.classes)
            fns, keep, extra, summary_zs, test_names = _zero_shot(s, test, classes, args)
        step("fitting ECIF")
        ecif = s.fit(con)
        step("trace-back")
        ids = test.ids()
        if zero_shot:
            table = (trace_back(ecif, fn=fns, k=args.k, info=s.train.info(), test_ids=ids[keep]) if keep.size
                     else None)
        else:
            keep = np.arange(test.n)
            table = trace_back(ecif, s.t(test.images), s.t(test.texts), k=args.k, info=s.train.info(),
                               test_ids=ids)
        s.finish(ecif, con)
    k = min(args.k, s.train.n)
    if table is None:
        import pandas as pd

        table = pd.DataFrame(columns=["test_id", "rank", "train_index", "pair_id", "relative_influence",
                                      "influence", "positive", "negative"])
    if test.captions is not None:
        extra = {"test_caption": test.captions[keep], **extra}
    for pos, (name, values) in enumerate(extra.items()):
        table.insert(1 + pos, name, np.repeat(values, k))
    summary = {"command": "trace", "mode": "zero-shot" if zero_shot else "pairs", "test": str(args.test),
               "n_test": test.n, "traced": int(keep.size), "k": k, "settings": s.settings}
    text = [f"traced {keep.size} test {'images' if zero_shot else 'pairs'} to their top {k} training pairs"]
    if zero_shot:
        summary.update(summary_zs)
        text.insert(0, f"zero-shot accuracy {summary_zs['accuracy']:.3f} on {test.n} test images")
    panels = [_panel(j, table.iloc[j * k:(j + 1) * k], test, keep[j], test_names, s.train)
              for j in range(min(keep.size, PANELS))]
    notes = ["relative_influence = influence / sqrt(self-influence) (RelatIF); the most negative are the pairs "
             "whose removal lowers the test loss most, i.e. those most responsible for it."]
    if keep.size > PANELS:
        notes.append(f"The report shows the first {PANELS} of {keep.size} traced test examples; "
                     "traceback.csv has all of them.")
    if zero_shot and keep.size == 0:
        notes.append("Every test image is predicted correctly: nothing to trace with --only-wrong.")
    report = {"title": "ecif-fast trace: training pairs behind test predictions", "summary": summary,
              "subtitle": f"{keep.size} test examples from {args.test}, top {k} training pairs each",
              "headline": [("traced test examples", int(keep.size)), ("pairs per test", k)]
              + ([("zero-shot accuracy", summary["accuracy"])] if zero_shot else []),
              "notes": notes, "traceback": panels}
    files = write_outputs(args, report, {"traceback": table})
    return command_result("trace", args, summary, files, text)


def _zero_shot(s: Setup, test: PairsData, classes: PairsData, args):
    """Test functions for the zero-shot losses of the (mispredicted) test images, and display columns."""
    if test.labels is None:
        raise DataFileError(f"{args.test}: no 'labels' array; zero-shot trace-back needs the class index of "
                            "each test image")
    n_classes = classes.texts.shape[0]
    if (test.labels >= n_classes).any():
        raise DataFileError(f"{args.test}: labels go up to {int(test.labels.max())} but {args.classes} has "
                            f"{n_classes} classes; labels must index its rows")
    names = classes.class_names
    if names is None and test.class_names is not None and test.class_names.shape[0] == n_classes:
        names = test.class_names
    if names is None:
        names = np.array([f"class {c}" for c in range(n_classes)])
    images, prompts = s.t(test.images), s.t(classes.texts)
    with torch.no_grad():
        pred = zero_shot_logits(s.model, images, prompts).argmax(1).numpy()
    correct = pred == test.labels
    keep = np.flatnonzero(~correct) if args.only_wrong else np.arange(test.n)
    fns = zero_shot_losses(images[keep], torch.from_numpy(test.labels[keep]), prompts) if keep.size else []
    extra = {"test_label": names[test.labels[keep]], "test_predicted": names[pred[keep]]}
    summary = {"classes": str(args.classes), "n_classes": n_classes, "accuracy": float(correct.mean()),
               "only_wrong": bool(args.only_wrong)}
    return fns, keep, extra, summary, (names[test.labels], names[pred])


def _panel(j: int, rows, test: PairsData, index: int, test_names, train: PairsData) -> dict:
    tid = test.ids()[index]
    if test_names is not None:
        true, pred = test_names[0][index], test_names[1][index]
        title = f"test image {tid}: true {true}, predicted {pred}" + ("" if true == pred else " (wrong)")
    else:
        title = f"test pair {tid}"
    top = []
    for r in rows.to_dict("records"):
        top.append({"pair_id": r["pair_id"], "caption": r.get("caption"),
                    "image": image_ref(r.get("image_path"), train.path),
                    "misaligned": r.get("misaligned"), "relative_influence": r["relative_influence"],
                    "influence": r["influence"]})
    path = test.image_paths[index] if test.image_paths is not None else None
    return {"title": title, "image": image_ref(path, test.path),
            "caption": test.captions[index] if test.captions is not None else None, "top": top}


# ============================================================================================= clean

def clean(args, con: Console) -> dict:
    """Remove training pairs (listed, or the most harmful by validation influence) by the ECIF update."""
    if args.top_harmful is not None:
        if not 0 < args.top_harmful < 1:
            raise UsageError(f"--top-harmful must lie in (0, 1) (a fraction of the training pairs), got "
                             f"{args.top_harmful:g}")
        if not args.val:
            raise UsageError("--top-harmful needs trusted validation pairs to rank the pairs: pass --val FILE")
    with con.steps(4 + bool(args.retrain)) as step:
        step("loading")
        s = setup(args, con)
        val = s.pairs(args.val) if args.val else None
        ev = s.pairs(args.eval) if args.eval else val
        classes = s.classes(args.classes) if args.classes else None
        if classes is not None and (ev is None or ev.labels is None):
            con.warn("--classes is used only with an --eval (or --val) file that has a labels column; "
                     "no zero-shot accuracy is reported")
            classes = None
        if classes is not None and (ev.labels >= classes.texts.shape[0]).any():
            raise DataFileError(f"{ev.path}: labels go up to {int(ev.labels.max())} but {args.classes} has "
                                f"{classes.texts.shape[0]} classes; labels must index its rows")
        removed = ids_to_indices(load_ids(args.remove), s.train, args.remove) if args.remove else None
        step("fitting ECIF")
        ecif = s.fit(con)
        removed_table = _removal(s, ecif, val, removed, args)
        removed = removed_table["train_index"].to_numpy()
        step("ECIF update" + (" and retraining" if args.retrain else ""))
        kwargs = {"theta_ref": s.training["theta_ref"], "method": s.training.get("method", "auto"),
                  "max_iter": int(s.training.get("max_iter", 200))}
        result = clean_pairs(ecif, torch.tensor(removed), retrain=args.retrain, train_kwargs=kwargs,
                             evaluate=_evaluator(s, ev, classes) if ev is not None else None)
        step("writing")
        keep = np.ones(s.train.n, dtype=bool)
        keep[removed] = False
        records = {"cleaned.pt": _record(s, ecif, result.model, keep, removed_table, 0)}
        if result.retrained is not None:
            records["retrained.pt"] = _record(s, ecif, result.retrained, keep, removed_table, None)
    models = {"cleaned.pt": result.model, "retrained.pt": result.retrained}
    extra = {name: (lambda path, n=name: save_checkpoint(path, models[n], records[n])) for name in records}
    summary = {"command": "clean", "removed": int(removed.size), "n_train": s.train.n,
               "remaining": int(keep.sum()), "selection": (f"top {args.top_harmful:g} most harmful by --val"
                                                             if args.remove is None else str(args.remove)),
               "removed_pair_ids": plain_ids(removed_table["pair_id"].to_numpy()),
               "eval": str(args.eval or args.val) if ev is not None else None,
               "cleaning": {r.pop("setting"): r for r in result.table.to_dict("records")},
               "timings_s": result.timings_s,
               "objective": {n: {"loss": r["loss"], "grad_norm": r["grad_norm"]} for n, r in records.items()},
               "settings": s.settings}
    report = {"title": "ecif-fast clean: removing training pairs", "summary": summary,
              "subtitle": f"{removed.size} of {s.train.n} training pairs removed ({summary['selection']})",
              "headline": [("removed pairs", int(removed.size)), ("ECIF update (s)", result.timings_s["ecif_update"])]
              + ([("retrain (s)", result.timings_s["retrain"])] if args.retrain else []),
              "notes": ["ECIF update = the Newton step theta + H^-1 g(removed) (no retraining), saved as "
                        "cleaned.pt" + ("; retrain = warm-started retraining without the pairs, saved as "
                                        "retrained.pt." if args.retrain else ".")
                        + " Their training record lists the remaining pairs' batch ids: use them with the "
                        "training file minus the removed pairs."],
              "tables": {"Cleaning": result.table, "Removed pairs": removed_table}}
    files = write_outputs(args, report, {"cleaning": result.table, "removed": removed_table}, extra)
    text = [f"removed {removed.size} of {s.train.n} pairs"] + [
        f"  {setting}: " + ", ".join(f"{k} {v:.6g}" for k, v in row.items())
        for setting, row in summary["cleaning"].items()]
    return command_result("clean", args, summary, files, text)


def _removal(s: Setup, ecif: ECIF, val, removed, args):
    """The pairs to remove as a table (``train_index``, metadata, validation influence when ranked by it)."""
    import pandas as pd

    cols = {}
    if removed is None:
        res = ecif.influence(s.t(val.images), s.t(val.texts))
        total = res.total.double().numpy()
        count = max(1, int(round(args.top_harmful * s.train.n)))
        count = min(count, s.train.n - 1)
        removed = np.argsort(total, kind="stable")[:count]
        cols["influence"] = total[removed]
    info = s.train.info().columns(s.train.n)
    table = pd.DataFrame({"train_index": removed, **{k: v[removed] for k, v in info.items()}, **cols})
    return table


def _evaluator(s: Setup, ev: PairsData, classes: PairsData | None):
    images, texts = s.t(ev.images), s.t(ev.texts)
    prompts = s.t(classes.texts) if classes is not None else None
    labels = torch.from_numpy(ev.labels) if classes is not None else None

    def evaluate(model) -> dict:
        out = {"eval_loss": pairs_loss(model, images, texts)}
        if prompts is not None:
            pred = zero_shot_logits(model, images, prompts).argmax(1)
            out["zero_shot_accuracy"] = float((pred == labels).double().mean())
        return out

    return evaluate


def _record(s: Setup, ecif: ECIF, model, keep: np.ndarray, removed_table, iterations) -> dict:
    """Training record of a cleaned model: the remaining pairs' batches, the same damping and θ_ref."""
    kept = torch.from_numpy(keep)
    batch_ids = ecif.plan.batch_ids()[kept]
    X, Y = s.t(s.train.images[kept]), s.t(s.train.texts[kept])
    ref = torch.as_tensor(s.training["theta_ref"]).to(s.dtype)
    with torch.enable_grad():
        at = objective(model, X, Y, batches=batch_ids, damping=ecif.damping, theta_ref=ref)
    subset = PairsData(s.train.path, s.train.images[kept], s.train.texts[kept])
    return {"damping": float(ecif.damping), "batch_ids": batch_ids, "theta_ref": ref, "loss": at.loss,
            "grad_norm": at.grad_norm, "iterations": iterations,
            "method": s.training.get("method", "auto"), "max_iter": s.training.get("max_iter", 200),
            "n_train": int(keep.sum()), "fingerprint": subset.fingerprint(),
            "removed_pair_ids": [str(v) for v in removed_table["pair_id"].tolist()]}


COMMANDS = {"demo": demo, "train": train, "value": value, "detect": detect, "trace": trace, "clean": clean}

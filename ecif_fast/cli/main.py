"""``ecif-fast``: influence functions for CLIP-style heads on your own feature files.

    ecif-fast train  --train train.npz --out heads.pt
    ecif-fast value  --train train.npz --model heads.pt --val val.npz --out value/
    ecif-fast detect --train train.npz --model heads.pt [--val val.npz] --out detect/
    ecif-fast trace  --train train.npz --model heads.pt --test test.npz [--classes classes.npy] --out trace/
    ecif-fast clean  --train train.npz --model heads.pt (--remove ids.csv | --top-harmful 0.05 --val val.npz)
                     [--retrain] [--eval eval.npz] --out clean/
    ecif-fast demo   [--out ecif-demo-report]

Feature files: .npz (or .parquet, or a structured .npy) with image_features (n, Di), text_features (n, Dt)
and optional captions, image_paths, batch_ids, pair_ids, misaligned, labels, class_names.
Errors in the inputs or options exit with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import threading
import warnings

# Only the standard library (and the torch-free option names) at import time: torch loads inside main(), under
# its Ctrl-C handling.
from ..options import CURVATURES, DEFAULT_SOFT_NORM, SCORINGS, TRAINING_METHODS

BACKENDS = ("torch", "cpp", "triton")
DEFAULT_TRAIN_DAMPING = 10.0    # train: weight decay towards the start (docs/math.md §2.1)
DEBUG_ENV = "ECIF_FAST_DEBUG"   # set to 1: unexpected errors show their traceback instead of one line
SEED_LIMIT = 2 ** 63            # torch.manual_seed / torch.Generator take seeds below this
# the logit scale s enters as t = exp(s); beyond this t (or 1/t) overflows float32
LOGIT_SCALE_LIMIT = math.floor(math.log(3.4e38))


def user_errors() -> tuple:
    """The exception types that are the user's to fix: one line on stderr, exit status 2."""
    from ..errors import BackendUnavailableError, ECIFInputError, NotPositiveDefiniteError
    from .checkpoint import CheckpointError
    from .data_files import DataFileError
    from .session import UsageError
    from ..report.output import OutputLocationError

    return (DataFileError, CheckpointError, UsageError, OutputLocationError, FileExistsError, PermissionError,
            ECIFInputError, NotPositiveDefiniteError, BackendUnavailableError)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (status 2), like the rest of the command line."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(text: str, parse, ok, need: str):
    """``parse(text)`` if it gives a value for which ``ok(value)``, else an argparse error saying ``need``."""
    try:
        value = parse(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {need}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "a positive integer")


def _positive_float(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < math.inf, "a positive number")


def _unit_interval(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < 1, "a number in (0, 1)")


def _rank(text: str) -> int | str:
    return text if text in ("auto", "full") else _positive_int(text)


def _soft_norm(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def _seed(text: str) -> int:
    return _number(text, int, lambda v: 0 <= v < SEED_LIMIT, "a whole number in [0, 2**63)")


def _logit_scale(text: str) -> float:
    # |s| <= limit also refuses NaN; t = exp(s) is the softmax multiplier, CLIP's log(1/0.07) = 2.66
    return _number(text, float, lambda v: abs(v) <= LOGIT_SCALE_LIMIT,
                   f"a finite number in [-{LOGIT_SCALE_LIMIT}, {LOGIT_SCALE_LIMIT}] (the log of the softmax "
                   "multiplier t = exp(s); CLIP uses log(1/0.07) = 2.66)")


def _batch_size(text: str) -> str:
    return "all" if text == "all" else str(_positive_int(text))


def _output_flags(p, *, out_help: str, out_default=None) -> None:
    p.add_argument("--out", required=out_default is None, default=out_default, help=out_help)
    p.add_argument("--seed", type=_seed, default=0, help="random seed in [0, 2**63) (default 0)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (result summary and output paths) on stdout, nothing else")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no result lines")


def _analysis(sub, name: str, help: str) -> argparse.ArgumentParser:
    from ..solvers.registry import DEFAULT_POLICY, solver_names    # standard library only

    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--train", required=True, metavar="FILE", help="the training pairs the model was trained on")
    p.add_argument("--model", required=True, metavar="CKPT", help="checkpoint written by `ecif-fast train`")
    _output_flags(p, out_help="output folder (written atomically)")
    p.add_argument("--backend", choices=BACKENDS, help="kernel backend (default: fastest available)")
    p.add_argument("--solver", choices=solver_names(), help=f"inverse-curvature solver (default: {DEFAULT_POLICY})")
    p.add_argument("--curvature", choices=CURVATURES, default="gauss-newton",
                   help="curvature matrix H (default gauss-newton)")
    p.add_argument("--damping", type=_positive_float,
                   help="damping delta of H (default: the checkpoint's training damping)")
    p.add_argument("--cg-tol", type=_unit_interval, default=1e-10,
                   help="cg solver: relative residual to stop at, in (0, 1) (default 1e-10)")
    p.add_argument("--cg-maxiter", type=_positive_int,
                   help="cg solver: iterations per solve (default max(100, 2 x parameters))")
    p.add_argument("--no-precondition", action="store_true",
                   help="cg solver: plain CG, without the spectral-factor preconditioner")
    p.add_argument("--batch-size", type=_batch_size, metavar="N|all",
                   help="override the checkpoint's training batches (not recommended)")
    p.add_argument("--allow-data-mismatch", action="store_true",
                   help="analyse although --train is not the file the checkpoint was trained on (not recommended: "
                        "influence assumes the model is at the optimum for these pairs)")
    p.add_argument("--cache", metavar="DIR",
                   help="reuse fitted ECIF states across commands: load the state fitted on this checkpoint, "
                        "training data and these options from DIR if there is one, else fit and save it there "
                        "(default: no cache, nothing is written outside --out)")
    p.add_argument("--no-cache", action="store_true", help="ignore --cache: fit, read and write no cache")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ecif-fast", description=__doc__.splitlines()[0],
                 epilog="Run `ecif-fast COMMAND --help` for the options of each command.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo", help="synthetic end-to-end run with an HTML report")
    _output_flags(p, out_help="report folder (default ecif-demo-report)", out_default="ecif-demo-report")
    p.add_argument("--backend", choices=BACKENDS, help="kernel backend (default: fastest available)")
    p.add_argument("--quick", action="store_true", help="smaller problem, a few seconds")

    p = sub.add_parser("train", help="fit CLIP-style linear heads on a training feature file",
                       description="Fit LinearHeads by minimising sum(loss) + damping/2 |theta - theta_init|^2. By "
                                   "default each side's features are centred and whitened and the heads start at "
                                   "their canonical correlation directions (theta_init).")
    p.add_argument("--train", required=True, metavar="FILE", help="training pairs")
    _output_flags(p, out_help="checkpoint file (default heads.pt)", out_default="heads.pt")
    p.add_argument("--embed-dim", type=_positive_int, help="embedding size (default min(64, Di, Dt, the rank))")
    p.add_argument("--rank", type=_rank, metavar="N|auto|full",
                   help="whitened dimensions kept per side, those of largest variance (default auto: the rank of "
                        "least held-out loss among 8, 12, 16, 24, ...; full: the features' whole span); fewer "
                        "trained parameters fit single captions less")
    p.add_argument("--batch-size", type=_batch_size, metavar="N|all",
                   help="pairs per batch, consecutive chunks (default: the file's batch_ids column, else 256)")
    p.add_argument("--damping", type=_positive_float, default=DEFAULT_TRAIN_DAMPING,
                   help=f"weight decay towards the initialisation (default {DEFAULT_TRAIN_DAMPING:g})")
    p.add_argument("--logit-scale", type=_logit_scale, default=math.log(1 / 0.07),
                   help="log of the softmax temperature multiplier (default log(1/0.07))")
    p.add_argument("--train-scale", action="store_true", help="also train the logit scale")
    p.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the embeddings")
    p.add_argument("--soft-norm", type=_soft_norm, default=DEFAULT_SOFT_NORM, metavar="F",
                   help="with whitening: normalise softly, z / sqrt(|z|^2 + eps^2) with eps this fraction of the "
                        f"starting embeddings' median norm (default {DEFAULT_SOFT_NORM:g}; 0: exact L2 "
                        "normalisation, whose optimum can drift to a zero-norm embedding)")
    p.add_argument("--no-whiten", action="store_true",
                   help="heads on the raw features from a random start (--seed) instead of whitened features "
                        "started at the canonical correlation directions")
    p.add_argument("--method", choices=TRAINING_METHODS, default="auto",
                   help="optimiser (default auto: Newton for small problems, else trust-region Newton-CG, or "
                        "L-BFGS with --train-scale; Newton refuses a dense Hessian above 2 GiB)")
    p.add_argument("--max-iter", type=_positive_int, default=200, help="optimiser iterations (default 200)")
    p.add_argument("--float32", action="store_true", help="train in float32 (default float64)")

    p = _analysis(sub, "value", "influence of every training pair on the validation loss")
    p.add_argument("--val", required=True, metavar="FILE", help="trusted validation pairs")

    p = _analysis(sub, "detect", "rank training pairs by how likely they are misaligned")
    p.add_argument("--val", metavar="FILE", help="trusted validation pairs")
    p.add_argument("--scoring", choices=SCORINGS,
                   help="ECIF score (default cleaned: the loss after the closed-form removal of the most "
                        "suspicious pairs; with --val the validation influence is a second column)")

    p = _analysis(sub, "trace", "training pairs responsible for test predictions")
    p.add_argument("--test", required=True, metavar="FILE",
                   help="test pairs, or (with --classes) test images with a labels column")
    p.add_argument("--classes", metavar="FILE", help="zero-shot: one text feature row per class")
    p.add_argument("--k", type=_positive_int, default=10, help="training pairs per test example (default 10)")
    p.add_argument("--only-wrong", action="store_true", help="zero-shot: trace only mispredicted images")

    p = _analysis(sub, "clean", "remove training pairs by the ECIF update (and optionally retrain)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--remove", metavar="FILE", help="pair ids to remove (.csv column pair_id, .txt, .npy)")
    what.add_argument("--top-harmful", type=float, metavar="FRACTION",
                      help="remove this fraction of pairs, the most harmful by --val influence")
    p.add_argument("--val", metavar="FILE", help="trusted validation pairs (ranking and default --eval)")
    p.add_argument("--retrain", action="store_true", help="also retrain without the pairs, for comparison")
    p.add_argument("--eval", metavar="FILE", help="pairs to evaluate the models on (default --val)")
    p.add_argument("--classes", metavar="FILE", help="class prompts: zero-shot accuracy on --eval's labels")
    return ap


def to_json(value):
    """``value`` with numpy / torch numbers as plain Python and NaN / ±inf as None."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if hasattr(value, "tolist"):
        return to_json(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """Library warnings (e.g. a CG solve that stopped early) as one line, like the CLI's own."""
    print(f"ecif-fast: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _failure(e: BaseException) -> int:
    """Report an exception raised by a command as one line on stderr; returns the exit status (2)."""
    try:
        known = user_errors()
    except Exception:                            # the failure was in loading these very modules
        known = ()
    if isinstance(e, known):
        message = _one_line(e) or type(e).__name__
    elif isinstance(e, ImportError) and "pip install" in str(e):     # a missing optional dependency
        message = _one_line(e)
    elif isinstance(e, MemoryError) or "can't allocate memory" in str(e):
        from ..solvers.registry import MATRIX_FREE_SOLVER

        message = ("out of memory; use smaller inputs, a smaller --embed-dim, or the matrix-free solver "
                   f"(--solver {MATRIX_FREE_SOLVER}) instead of a dense one")
    elif isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        message = f"{where}{e.strerror}"
    else:
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise e
        message = (f"unexpected {type(e).__name__}: {_one_line(e)[:300]} (this is a bug in ecif-fast; please "
                   f"report it with the command line; {DEBUG_ENV}=1 shows the traceback)")
    print(f"ecif-fast: error: {message}", file=sys.stderr)
    return 2


class _Interrupts:
    """Ctrl-C (SIGINT) during a run: the first one raises KeyboardInterrupt, so that outputs being written
    are rolled back and the run ends with status 130; a second one while that unwinds ends the process at
    once (status 130); one that comes after the run has finished is ignored."""

    def __init__(self):
        self.previous = None
        self.state = "off"

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return                                  # an embedding program handles Ctrl-C itself
        self.previous = signal.signal(signal.SIGINT, self._handle)
        self.state = "running"

    def _handle(self, signum, frame):
        if self.state == "running":
            self.state = "interrupted"
            raise KeyboardInterrupt
        if self.state == "interrupted":
            os.write(2, b"ecif-fast: interrupted\n")
            os._exit(130)
        # finished: the result stands

    def finish(self, *, restore: bool) -> None:
        if self.state == "off":
            return
        self.state = "finished"
        if restore:
            signal.signal(signal.SIGINT, self.previous)
        elif hasattr(signal, "pthread_sigmask"):
            # The console script exits next: the interpreter's finalisation puts back the default action
            # (terminate), so a Ctrl-C in that last window would kill a finished run. Blocked, it stays
            # pending and dies with the process.
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def main(argv=None) -> int:
    """Run ``ecif-fast`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status: 0 done, 2 a
    problem with the inputs or options (one line on stderr), 130 interrupted."""
    return _guarded(argv, restore=True)


def run() -> int:
    """The ``ecif-fast`` console script: :func:`main`, with Ctrl-C after the run ignored up to the exit."""
    return _guarded(None, restore=False)


def _guarded(argv, *, restore: bool) -> int:
    interrupts = _Interrupts()
    interrupts.install()
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("ecif-fast: interrupted", file=sys.stderr)
        return 130
    finally:
        interrupts.finish(restore=restore)


def _main(argv) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 0 if e.code is None else 2
    try:
        with warnings.catch_warnings():          # restores showwarning afterwards
            warnings.showwarning = _show_warning
            # torch's own forward-AD decompositions call torch.jit.script (deprecated in torch >= 2.14):
            # nothing a user can act on.
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
            from .commands import COMMANDS
            from .session import Console

            con = Console(quiet=args.quiet, json=args.json)
            result = COMMANDS[args.command](args, con)
    except Exception as e:
        return _failure(e)
    if result is None or isinstance(result, int):
        return result or 0
    text = result.pop("text", [])
    try:
        if args.json:
            print(json.dumps(to_json(result), allow_nan=False))
        elif not args.quiet:
            print("\n".join(text))
        sys.stdout.flush()
    except BrokenPipeError:                      # e.g. `ecif-fast ... | head -1`: the outputs are written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    raise SystemExit(run())

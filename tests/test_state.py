"""Saving a fitted ECIF and loading it without refitting (``ECIF.save`` / ``ECIF.load``, ``ecif_fast/state.py``):
bit-identical results across processes, the self-influence cache, stale / damaged states, atomic writes, and the
command line's ``--cache``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ecif_fast as ef
from ecif_fast.errors import ECIFInputError
from ecif_fast.report.output import MARKER, TMP_PREFIX
from ecif_fast.solvers import Solver, register_solver, unregister_solver
from ecif_fast.state import STATE_JSON, TENSORS, is_state

# ------------------------------------------------------------------------------ across processes

#: Run once with ``save ROOT`` and once with ``load ROOT`` (two fresh interpreters): the same models and data
#: from fixed seeds; ``save`` fits, fills the self-influence caches and saves every case, ``load`` loads them with
#: the curvature's products and the solvers' constructors disabled (loading must not refit). Both write their
#: query results to ``ROOT/<case>.<mode>.safetensors``.
SCRIPT = textwrap.dedent('''
    import itertools, sys, warnings
    from pathlib import Path
    import torch
    from safetensors.torch import save_file
    import ecif_fast as ef
    from ecif_fast.solvers.curvature import Curvature

    warnings.simplefilter("ignore")
    mode, root = sys.argv[1], Path(sys.argv[2])

    def problem(dtype):
        g = torch.Generator().manual_seed(3)
        Z = torch.randn(26, 3, generator=g, dtype=torch.float64)
        def noise(d):
            return 0.3 * torch.randn(26, d, generator=g, dtype=torch.float64)

        X = Z @ torch.randn(3, 6, generator=g, dtype=torch.float64) + noise(6)
        Y = Z @ torch.randn(3, 5, generator=g, dtype=torch.float64) + noise(5)
        torch.manual_seed(1)
        model = ef.LinearHeads(6, 5, 4, normalize=True, logit_scale=1.0, train_scale=True).to(dtype)
        return model, X[:20].to(dtype), Y[:20].to(dtype), X[20:].to(dtype), Y[20:].to(dtype)

    def forbidden(*args, **kwargs):
        raise AssertionError("loading computed a curvature product")

    for dtype, batches, solver in itertools.product((torch.float64, torch.float32), (5, None),
                                                    ("exact", "cg", "lowrank")):
        inputs = (dtype == torch.float64) == (batches == 5)    # every solver, dtype and batching with and without
        name = f"{str(dtype)[6:]}-{batches or 'all'}-{solver}-{'inputs' if inputs else 'noinputs'}"
        model, X, Y, Xt, Yt = problem(dtype)
        if mode == "save":
            # rank 40 of P = 45: CG's preconditioner is nearly exact, so its solves take a few iterations
            ecif = ef.ECIF(model, damping=0.2, batches=batches, solver=solver, curvature="gauss-newton", rank=40,
                           cg_maxiter=50).fit(X, Y)
            ecif.self_influence()                                  # the all-pairs cache, saved
            if solver == "exact":
                ecif.self_influence(method="factor")               # a separately built spectral factor, saved
            ecif.save(root / name, include_inputs=inputs)
        else:
            saved = (Curvature.matvec, Curvature.dense)
            Curvature.matvec = Curvature.dense = forbidden
            try:
                ecif = ef.ECIF.load(root / name, model, *(() if inputs else (X, Y)))
            finally:
                Curvature.matvec, Curvature.dense = saved
            assert sorted(ecif._self_influence) == (["factor", "solve"] if solver == "exact" else ["factor"]), name
        res = ecif.influence(Xt, Yt)
        per = ecif.influence(Xt, Yt, per_test=True)
        update = ecif.removal_update([1, 7])
        out = {"total": res.total, "positive": res.positive, "negative": res.negative, "per_test": per.total,
               "self": ecif.self_influence(), "self_factor": ecif.self_influence(method="factor"),
               "self_some": ecif.self_influence([0, 4, 9], method="solve"),
               "self_some_factor": ecif.self_influence([2, 3], method="factor"),
               "update": torch.cat([update[k].reshape(-1) for k in sorted(update)]),
               "damping": torch.tensor(ecif.damping)}
        save_file({k: v.contiguous() for k, v in out.items()}, str(root / f"{name}.{mode}.safetensors"))
''')


def _run(script: Path, *args):
    done = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_round_trip_is_bit_identical_across_processes(tmp_path):
    """12 cases: float64 / float32 × batches / "all" negatives × exact / cg / lowrank, the training inputs saved
    in half of them (each solver, dtype and batching both ways)."""
    script = tmp_path / "roundtrip.py"
    script.write_text(SCRIPT)
    _run(script, "save", tmp_path)
    _run(script, "load", tmp_path)
    saved = sorted(p.name[:-len(".save.safetensors")] for p in tmp_path.glob("*.save.safetensors"))
    assert len(saved) == 12
    for name in saved:
        a = load_file(str(tmp_path / f"{name}.save.safetensors"))
        b = load_file(str(tmp_path / f"{name}.load.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), (name, key)
        assert float(a["total"].abs().max()) > 0, name
    # the inputs are in the state only when asked for
    with_inputs = load_file(str(tmp_path / "float64-5-exact-inputs" / TENSORS))
    without = load_file(str(tmp_path / "float64-all-exact-noinputs" / TENSORS))
    assert "inputs.images" in with_inputs and "inputs.images" not in without
    assert {"solver.L", "self_influence.solve", "self_influence.factor", "factor.vecs"} <= set(without)
    assert {"solver.preconditioner.vecs", "self_influence.factor"} <= set(
        load_file(str(tmp_path / "float32-5-cg-noinputs" / TENSORS)))


# ------------------------------------------------------------------------------ in process

def _problem(n=16, dtype=torch.float64, normalize=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + 4, 6, generator=g, dtype=torch.float64).to(dtype)
    Y = torch.randn(n + 4, 5, generator=g, dtype=torch.float64).to(dtype)
    torch.manual_seed(seed)
    model = ef.LinearHeads(6, 5, 4, normalize=normalize, logit_scale=1.0).to(dtype)
    return model, X[:n], Y[:n], X[n:], Y[n:]


@pytest.fixture
def fitted(tmp_path):
    model, X, Y, Xt, Yt = _problem()
    ecif = ef.ECIF(model, damping=0.1, batches=4, solver="exact", curvature="gauss-newton").fit(X, Y)
    return ecif, X, Y, Xt, Yt


def test_layout_is_safetensors_and_json_without_pickle(fitted, tmp_path):
    ecif, X, Y, Xt, Yt = fitted
    path = ecif.save(tmp_path / "state")
    assert sorted(p.name for p in path.iterdir()) == sorted([MARKER, STATE_JSON, TENSORS]) and is_state(path)
    head = json.loads((path / STATE_JSON).read_text())
    assert head["format"] == "ecif-fast state" and head["version"] == 1
    s = head["settings"]
    assert (s["solver"], s["curvature"], s["negative_term"], s["batches"], s["damping"]) == (
        "exact", "gauss-newton", "exact", 4, 0.1)
    assert s["params"] == ["image_proj.weight", "text_proj.weight"] and head["damping"] == 0.1
    assert len(head["model"]["parameters"]) == 64 and len(head["data"]["fingerprint"]) == 64
    tensors = load_file(str(path / TENSORS))
    assert torch.equal(tensors["theta"], ecif.theta) and torch.equal(tensors["U"], ecif.U)
    assert tensors["solver.L"].shape == (ecif.space.size, ecif.space.size)
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))
    # "auto" damping: the value used is saved, the argument too
    auto = ef.ECIF(ecif.model, batches=4, solver="lowrank", rank=40, curvature="gauss-newton").fit(X, Y)
    again = ef.ECIF.load(auto.save(tmp_path / "auto"), ecif.model)
    assert again.damping_arg == "auto" and again.damping == auto.damping
    assert again.factor_summary() == auto.factor_summary()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_hessian_curvature_ids_batches_and_hessian_batches(tmp_path):
    model, X, Y, Xt, Yt = _problem(n=18)
    ids = torch.arange(18) % 3
    ecif = ef.ECIF(model, damping=500.0, batches=ids, solver="cg", curvature="hessian", hessian_batches=[0, 2],
                   precondition=False).fit(X, Y)             # δ above the indefinite Hessian's |λ_min| ≈ 343
    ref = ecif.influence(Xt, Yt)
    again = ef.ECIF.load(ecif.save(tmp_path / "s"), model)
    assert torch.equal(again.batches_arg, ids) and again.hessian_batches == [0, 2]
    assert again.solver.preconditioner is None and again.curvature.factor == ecif.curvature.factor
    assert torch.equal(again.influence(Xt, Yt).total, ref.total)


def test_stale_model_and_data_are_refused(fitted, tmp_path):
    ecif, X, Y, Xt, Yt = fitted
    path = ecif.save(tmp_path / "state", include_inputs=False)
    with pytest.raises(ECIFInputError, match="saved without its training inputs"):
        ef.ECIF.load(path, ecif.model)
    X2 = X.clone()
    X2[3, 1] += 1e-12
    with pytest.raises(ECIFInputError, match="training inputs differ from those the state was fitted with"):
        ef.ECIF.load(path, ecif.model, X2, Y)
    with pytest.raises(ECIFInputError, match="training inputs differ"):
        ef.ECIF.load(path, ecif.model, X[:-1], Y[:-1])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=5)
    from_loader = ef.ECIF.load(path, ecif.model, loader)                # a DataLoader, as fit takes it: streamed
    assert from_loader.source.streamed and torch.equal(from_loader.X, X)
    assert torch.equal(from_loader.influence(Xt, Yt).total, ecif.influence(Xt, Yt).total)
    other, *_ = _problem(seed=1)
    with pytest.raises(ECIFInputError, match=r"the model's parameters differ from those the state was fitted "
                                             r"with .*refit with ECIF\(\.\.\.\)\.fit"):
        ef.ECIF.load(path, other, X, Y)
    with torch.no_grad():
        other.load_state_dict(ecif.model.state_dict())
        other.logit_scale.add_(1e-9)                         # the logit scale is part of the fingerprint
    with pytest.raises(ECIFInputError, match="the model's parameters differ"):
        ef.ECIF.load(path, other, X, Y)
    wider = ef.LinearHeads(6, 5, 3, logit_scale=1.0).double()
    with pytest.raises(ECIFInputError, match="the model's parameters differ"):
        ef.ECIF.load(path, wider, X, Y)
    with pytest.raises(ECIFInputError, match="the model's parameters differ"):
        ef.ECIF.load(path, ecif.model.float(), X, Y)
    # same weights, other code: normalisation switched off is caught by the embedding check
    plain = ef.LinearHeads(6, 5, 4, normalize=False, logit_scale=1.0).double()
    plain.load_state_dict(ecif.model.state_dict())
    with pytest.raises(ECIFInputError, match="embeds the training pairs differently"):
        ef.ECIF.load(path, plain, X, Y)


def test_damaged_states_are_refused(fitted, tmp_path):
    ecif, X, Y, Xt, Yt = fitted
    ecif.self_influence()
    good = ecif.save(tmp_path / "good")

    def copy(name):
        import shutil

        return Path(shutil.copytree(good, tmp_path / name))

    with pytest.raises(ECIFInputError, match="no such ecif-fast state"):
        ef.ECIF.load(tmp_path / "missing", ecif.model)
    with pytest.raises(ECIFInputError, match="is not an ecif-fast state"):
        ef.ECIF.load(tmp_path, ecif.model)
    flipped = copy("flipped")
    data = bytearray((flipped / TENSORS).read_bytes())
    data[-5] ^= 0x40
    (flipped / TENSORS).write_bytes(bytes(data))
    with pytest.raises(ECIFInputError, match="damaged or truncated"):
        ef.ECIF.load(flipped, ecif.model)
    truncated = copy("truncated")
    with open(truncated / TENSORS, "r+b") as f:
        f.truncate(os.path.getsize(truncated / TENSORS) // 2)
    for check in (True, False):                      # without the checksum, safetensors itself refuses it
        with pytest.raises(ECIFInputError, match="damaged or truncated"):
            ef.ECIF.load(truncated, ecif.model, check=check)
    (copy("nofile") / TENSORS).unlink()
    with pytest.raises(ECIFInputError, match="missing"):
        ef.ECIF.load(tmp_path / "nofile", ecif.model)
    cut = copy("cutjson")
    (cut / STATE_JSON).write_text((cut / STATE_JSON).read_text()[:200])
    with pytest.raises(ECIFInputError, match="damaged or truncated"):
        ef.ECIF.load(cut, ecif.model)

    def edited(name, change):
        p = copy(name)
        head = json.loads((p / STATE_JSON).read_text())
        change(head)
        (p / STATE_JSON).write_text(json.dumps(head))
        return p

    newer = edited("newer", lambda h: h.update(version=2))
    with pytest.raises(ECIFInputError, match="newer ecif-fast .*version 2.*reads versions up to 1"):
        ef.ECIF.load(newer, ecif.model)
    unknown = edited("unknown", lambda h: h["solver"].update(name="mystery"))
    with pytest.raises(ECIFInputError, match="solver 'mystery', which is not registered"):
        ef.ECIF.load(unknown, ecif.model)
    odd = edited("odd", lambda h: h.update(n="many"))
    with pytest.raises(ECIFInputError, match="the state is inconsistent"):
        ef.ECIF.load(odd, ecif.model)
    # the good one still loads, with its self-influence cache
    again = ef.ECIF.load(good, ecif.model)
    assert torch.equal(again._self_influence["solve"], ecif.self_influence())


def test_saving_is_atomic_and_never_replaces_foreign_files(fitted, tmp_path, monkeypatch):
    ecif, X, Y, Xt, Yt = fitted
    foreign = tmp_path / "notes.txt"
    foreign.write_text("mine")
    with pytest.raises(FileExistsError, match="not an ecif-fast state"):
        ecif.save(foreign)
    assert foreign.read_text() == "mine"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.txt").write_text("a")
    with pytest.raises(FileExistsError, match="not an ecif-fast state"):
        ecif.save(folder)
    assert [p.name for p in folder.iterdir()] == ["a.txt"]
    report = tmp_path / "report"                    # another ecif-fast output is not a state either
    report.mkdir()
    (report / MARKER).write_text(json.dumps({"tool": "ecif-fast", "command": "detect"}))
    with pytest.raises(FileExistsError, match="not an ecif-fast state"):
        ecif.save(report)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert is_state(ecif.save(empty))
    state = ecif.save(tmp_path / "state")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        ecif.save(state, overwrite=False)
    before = {p.name: p.read_bytes() for p in state.iterdir()}

    import safetensors.torch

    real = safetensors.torch.save_file

    def fails_halfway(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", fails_halfway)
    ecif.self_influence()
    with pytest.raises(OSError, match="No space left"):
        ecif.save(state)                             # over an existing state: it stays as it was
    with pytest.raises(OSError, match="No space left"):
        ecif.save(tmp_path / "new")                  # a new one: nothing is left
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    assert not os.path.lexists(tmp_path / "new")
    assert not list(tmp_path.glob(f"{TMP_PREFIX}*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "folder", "notes.txt", "report", "state"]
    assert torch.equal(ef.ECIF.load(state, ecif.model).influence(Xt, Yt).total, ecif.influence(Xt, Yt).total)
    with pytest.raises(RuntimeError, match="fit"):
        ef.ECIF(ecif.model, damping=0.1, curvature="hessian").save(tmp_path / "unfitted")


class OpaqueSolver(Solver):
    """A solver that was not written for saving."""

    name = "opaque-test"

    @classmethod
    def from_engine(cls, curvature, damping, dense, options):
        obj = cls()
        obj.damping = damping
        return obj

    def solve(self, B):
        return B / self.damping


def test_a_solver_without_state_dict_cannot_be_saved(tmp_path):
    model, X, Y, Xt, Yt = _problem()
    register_solver(OpaqueSolver)
    try:
        ecif = ef.ECIF(model, damping=0.1, batches=4, solver="opaque-test", curvature="hessian").fit(X, Y)
        with pytest.raises(NotImplementedError, match="solver 'opaque-test' .* cannot be saved"):
            ecif.save(tmp_path / "s")
    finally:
        unregister_solver("opaque-test")
    assert list(tmp_path.iterdir()) == []


def test_solver_state_dicts_refuse_unknown_attributes():
    from ecif_fast.solvers.exact import ExactSolver

    model, X, Y, Xt, Yt = _problem()
    ecif = ef.ECIF(model, damping=0.1, batches=4, solver="exact", curvature="gauss-newton").fit(X, Y)
    state = ecif.solver.state_dict()
    assert set(state) == {"L", "damping"}
    rebuilt = ExactSolver.from_state_dict(ecif.curvature, ecif.damping, state, None)
    assert torch.equal(rebuilt.solve(ecif.theta), ecif.solver.solve(ecif.theta))
    ecif.solver.extra = {"not": "saveable"}
    with pytest.raises(TypeError, match="attribute 'extra' is a dict"):
        ecif.solver.state_dict()


# ------------------------------------------------------------------------------ Hugging Face CLIP

def test_tiny_hf_clip_round_trip(tmp_path):
    pytest.importorskip("transformers")
    from tiny_hf_clip import pairs, tiny_clip

    px, ids = pairs(10)
    tpx, tids = pairs(4, seed=1)
    ecif = ef.ECIF(ef.wrap(tiny_clip()), damping=5e3, batches=5, params="heads", solver="exact",
                   curvature="hessian").fit(px, ids)
    ref = ecif.influence(tpx, tids)
    path = ecif.save(tmp_path / "clip", include_inputs=False)
    fresh = ef.wrap(tiny_clip())                      # the same weights, another instance
    again = ef.ECIF.load(path, fresh, px, ids)
    assert again.space.names == ecif.space.names
    res = again.influence(tpx, tids)
    assert torch.equal(res.total, ref.total) and torch.equal(res.negative, ref.negative)
    with torch.no_grad():                             # a frozen tower weight changed: the embeddings are stale
        fresh.clip.vision_model.embeddings.patch_embedding.weight.mul_(1.01)
    with pytest.raises(ECIFInputError, match="frozen parameters or buffers"):
        ef.ECIF.load(path, fresh, px, ids)


# ------------------------------------------------------------------------------ command line --cache

def test_cli_cache_hit_and_miss(cli_data, tmp_path, capsys):
    pytest.importorskip("pyarrow")
    from cli_data import analysis, run

    cache = tmp_path / "cache"

    def detect(out, *extra, train=None):
        rc, out_, err = run(capsys, *analysis(cli_data, "detect", tmp_path / out, "--val", cli_data.val,
                                              "--cache", cache, "--json", *extra, train=train))
        assert rc == 0, err
        summary = json.loads(out_)["summary"]
        scores = (tmp_path / out / "scores.csv").read_bytes()
        return summary["settings"].get("cache"), scores

    first, scores = detect("a")
    assert first["status"] == "miss" and first["saved"]
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("ecif-state-") and is_state(cache / entries[0])
    assert "inputs.images" not in load_file(str(cache / entries[0] / TENSORS))   # --train has them
    second, again = detect("b")
    assert second["status"] == "hit" and second["entry"] == first["entry"] and again == scores
    # the same features from another file format: the same data, a hit
    assert detect("c", train=cli_data.parquet)[0]["status"] == "hit"
    # another option, or another training file: a new fit in a new entry
    assert detect("d", "--damping", "2")[0]["status"] == "miss"
    assert detect("e", "--solver", "lowrank")[0]["status"] == "miss"
    changed = tmp_path / "train_changed.npz"
    arrays = dict(np.load(cli_data.train))
    arrays["image_features"] = arrays["image_features"].copy()
    arrays["image_features"][0, 0] += 1e-3
    np.savez(changed, **arrays)
    assert detect("f", "--allow-data-mismatch", train=changed)[0]["status"] == "miss"
    assert len(list(cache.iterdir())) == 4
    # self-influence computed on a hit is added to the entry, then reused
    hit, self_scores = detect("g", "--scoring", "self")
    assert hit["status"] == "hit" and hit["saved"]
    assert "self_influence.solve" in load_file(str(Path(hit["entry"]) / TENSORS))
    reused, same = detect("h", "--scoring", "self")
    assert reused["status"] == "hit" and "saved" not in reused and same == self_scores
    # a damaged entry is reported and refitted, never used
    entry = Path(first["entry"])
    with open(entry / TENSORS, "r+b") as f:
        f.truncate(64)
    rc, out, err = run(capsys, *analysis(cli_data, "detect", tmp_path / "i", "--val", cli_data.val, "--cache", cache))
    assert rc == 0 and "cannot be used" in err and "fitting again" in err
    assert (tmp_path / "i" / "scores.csv").read_bytes() == scores
    assert detect("j")[0]["status"] == "hit"
    # --no-cache: nothing read or written; --cache inside --out or on a file is refused before any work
    n_entries = len(list(cache.iterdir()))
    assert detect("k", "--no-cache")[0] is None and len(list(cache.iterdir())) == n_entries
    rc, out, err = run(capsys, *analysis(cli_data, "value", tmp_path / "v", "--val", cli_data.val,
                                         "--cache", tmp_path / "v" / "cache"))
    assert rc == 2 and "inside --out" in err and not (tmp_path / "v").exists()
    rc, out, err = run(capsys, *analysis(cli_data, "value", tmp_path / "v", "--val", cli_data.val,
                                         "--cache", cli_data.val))
    assert rc == 2 and "is a file" in err and not (tmp_path / "v").exists()


def test_cli_cache_serves_every_analysis_command(cli_data, tmp_path, capsys):
    """value, trace and clean reuse the entry detect wrote, with the same results as without the cache."""
    from cli_data import analysis, run

    cache = tmp_path / "cache"
    commands = {"detect": ["--val", cli_data.val], "value": ["--val", cli_data.val],
                "trace": ["--test", cli_data.test, "--k", "3"],
                "clean": ["--val", cli_data.val, "--top-harmful", "0.1"]}
    for i, (command, extra) in enumerate(commands.items()):
        outs = {}
        for how in ("--cache", "--no-cache"):
            out = tmp_path / f"{command}{how}"
            rc, stdout, err = run(capsys, *analysis(cli_data, command, out, *extra, "--cache", cache, "--json",
                                                    *([how] if how == "--no-cache" else [])))
            assert rc == 0, err
            outs[how] = json.loads(stdout)["summary"]
        assert outs["--cache"]["settings"]["cache"]["status"] == ("miss" if i == 0 else "hit"), command
        for key in ("harmful_pairs", "top_flagged", "removed_pair_ids", "most_harmful"):
            assert outs["--cache"].get(key) == outs["--no-cache"].get(key), (command, key)
    table = {h: (tmp_path / f"trace{h}" / "traceback.csv").read_bytes() for h in ("--cache", "--no-cache")}
    assert table["--cache"] == table["--no-cache"]
    assert len(list(cache.iterdir())) == 1

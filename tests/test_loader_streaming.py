"""``ECIF.fit(loader)`` streams: it keeps embeddings, not raw inputs, and reads the DataLoader again, batch by batch,
for every encoder pass (``ecif_fast/pair_source.py``). The oracle is the same ECIF fitted on the tensors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ecif_fast as ef
from ecif_fast import ECIFInputError
from ecif_fast.apps import clean
from ecif_fast.pair_source import LoaderPairs, Rows
from ecif_fast.state import TENSORS, fit_key

N = 23


def _data(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    X = Z @ torch.randn(3, 6, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 6, generator=g,
                                                                                      dtype=torch.float64)
    Y = Z @ torch.randn(3, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, 5, generator=g,
                                                                                      dtype=torch.float64)
    return X, Y


def _model():
    torch.manual_seed(1)
    return ef.LinearHeads(6, 5, 3, logit_scale=1.0, train_scale=True).double()


X, Y = _data()
XT, YT = _data(5, seed=9)


def _outputs(ecif):
    res = ecif.influence(XT, YT)
    return {"total": res.total, "negative": res.negative, "per_test": ecif.influence(XT, YT, per_test=True).total,
            "self": ecif.self_influence(), "self_solve": ecif.self_influence([0, 5, 22, 11], method="solve"),
            "pair_gradients": ecif.pair_gradients([3, 9, 14]),
            "group": ecif.group_influence([1, 6, 7, 20], XT, YT).total,
            "update": torch.cat([v.reshape(-1) for v in ecif.removal_update([1, 6, 7, 20]).values()])}


def _assert_same(a: dict, b: dict):
    for key in a:
        scale = float(a[key].abs().max())
        torch.testing.assert_close(b[key], a[key], rtol=1e-12, atol=1e-13 * scale, msg=key)


CASES = {
    "batches-int": dict(batches=4, solver="exact"),
    "all-negatives": dict(batches=None, solver="exact"),
    "ids-interleaved": dict(batches=torch.arange(N) % 3, solver="exact"),
    "ids-shuffled": dict(batches=torch.randperm(N, generator=torch.Generator().manual_seed(0)) % 4, solver="cg",
                         chunk_size=2),
    "hessian-cg": dict(batches=4, solver="cg", curvature="hessian", damping=1e8),
    # groups bigger than a loader batch and chunk_size: read piece by piece (Rows), not gathered
    "streamed-groups": dict(batches=7, solver="cg", chunk_size=3, tangent_chunk=2),
    "streamed-all": dict(batches=None, solver="lowrank", rank=4, chunk_size=4, tangent_chunk=3),
    "streamed-dense": dict(batches=None, solver="exact", chunk_size=4),
    "streamed-hessian": dict(batches=None, solver="cg", curvature="hessian", damping=1e8, chunk_size=4),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch_size", [1, 5, N])
def test_loader_fit_equals_tensor_fit(case, batch_size):
    kw = {"damping": 0.1, **CASES[case]}
    want = _outputs(ef.ECIF(_model(), **kw).fit(X, Y))
    ecif = ef.ECIF(_model(), **kw).fit(DataLoader(TensorDataset(X, Y), batch_size=batch_size))
    assert isinstance(ecif.source, LoaderPairs) and ecif.curvature.X is None and ecif.n == N
    assert not any(torch.is_tensor(v) and v.shape[:1] == (N,) and v.shape[1:] == X.shape[1:]
                   for v in vars(ecif).values())                                   # no raw inputs kept
    _assert_same(want, _outputs(ecif))


def test_groups_are_served_in_one_ordered_pass():
    reads = []

    class Counting(TensorDataset):
        def __getitem__(self, i):
            reads.append(i)
            return super().__getitem__(i)

    ecif = ef.ECIF(_model(), damping=0.1, batches=4, solver="exact").fit(DataLoader(Counting(X, Y), batch_size=5))
    reads.clear()
    list(ecif._gradient_blocks(torch.arange(N)))
    assert reads == list(range(N))                                # contiguous batches: one pass, in order
    reads.clear()
    ecif.self_influence([13])
    assert reads == list(range(20))                  # a new pass, up to the loader batch ending pair 13's batch
    reads.clear()
    ecif.self_influence([21])
    assert reads == list(range(20, N))                            # later batches: that pass goes on
    source = ecif.source
    served = list(source.serve([torch.tensor([0, 3]), torch.tensor([1, 2])]))   # not ordered: gathered in a wave
    assert torch.equal(served[0][0], X[[0, 3]]) and torch.equal(served[1][1], Y[[1, 2]])
    rows = Rows(source, torch.tensor([2, 3, 4, 8, 9, 20]))
    pieces = list(rows.pieces(4))
    assert [p[0] for p in pieces] == [slice(0, 4), slice(4, 6)]
    assert torch.equal(torch.cat([p[1] for p in pieces]), X[[2, 3, 4, 8, 9, 20]])
    assert torch.equal(source.take(torch.tensor([7, 1, 7])) [0], X[[7, 1, 7]])
    assert torch.equal(ecif.X, X) and torch.equal(ecif.Y, Y)                   # gathered on request only


# ------------------------------------------------------------------------------ loaders that change
class Noisy(Dataset):
    """Random augmentation: different values on every read."""

    def __len__(self):
        return N

    def __getitem__(self, i):
        return X[i] + 1e-3 * torch.randn(6, dtype=torch.float64), Y[i]


class Growing(TensorDataset):
    """A dataset that gains a pair after the first pass."""

    def __init__(self):
        super().__init__(X, Y)
        self.passes = 0

    def __len__(self):
        return N + (self.passes >= 1)

    def __getitem__(self, i):
        if i == 0:
            self.passes += 1
        return X[i % N], Y[i % N]


@pytest.mark.parametrize("make", [
    lambda: DataLoader(TensorDataset(X, Y), batch_size=5, shuffle=True),
    lambda: DataLoader(Noisy(), batch_size=5),
    lambda: DataLoader(Growing(), batch_size=5),
], ids=["shuffled", "augmented", "grows"])
def test_a_loader_that_changes_between_passes_is_refused(make):
    torch.manual_seed(0)
    with pytest.raises(ECIFInputError, match=r"changed between passes .*shuffle=False"):
        ef.ECIF(_model(), damping=0.1, batches=4, solver="exact").fit(make())


def test_a_loader_that_changes_after_fit_is_refused_at_the_next_pass():
    data = TensorDataset(X.clone(), Y)
    ecif = ef.ECIF(_model(), damping=0.1, batches=4, solver="exact").fit(DataLoader(data, batch_size=5))
    data.tensors[0][2, 0] += 1.0                                   # the first batch's checksum
    with pytest.raises(ECIFInputError, match="first batch holds different pairs"):
        ecif.influence(XT, YT)


def test_refused_loaders():
    with pytest.raises(ECIFInputError, match="read only once"):
        ef.ECIF(_model(), damping=0.1).fit(iter([(X[:5], Y[:5]), (X[5:], Y[5:])]))
    with pytest.raises(ECIFInputError, match="persistent_workers=False"):
        ef.ECIF(_model(), damping=0.1).fit(DataLoader(TensorDataset(X, Y), batch_size=5, num_workers=1,
                                                      persistent_workers=True))
    with pytest.raises(ECIFInputError, match="must yield \\(images, texts\\) pairs"):
        ef.ECIF(_model(), damping=0.1).fit([X[:5], X[5:]])
    with pytest.raises(ECIFInputError, match="empty data"):
        ef.ECIF(_model(), damping=0.1).fit([])
    with pytest.raises(ECIFInputError, match="images of shape"):
        ef.ECIF(_model(), damping=0.1).fit([(X[:5], Y[:5]), (X[5:, :4], Y[5:])])
    # a plain list of batches is a deterministic re-iterable: accepted
    batches = [(X[:10], Y[:10]), (X[10:], Y[10:])]
    got = ef.ECIF(_model(), damping=0.1, batches=4, solver="exact").fit(batches).influence(XT, YT).total
    want = ef.ECIF(_model(), damping=0.1, batches=4, solver="exact").fit(X, Y).influence(XT, YT).total
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


# ------------------------------------------------------------------------------ token ids padded per batch
class Tokens(nn.Module):
    """Images through a linear head, captions as the sum of their tokens' embeddings (pad id 0 adds an exact 0)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.image_proj = nn.Linear(6, 3, bias=False).double()
        self.tokens = nn.Embedding(12, 3).double()
        self.logit_scale = nn.Parameter(torch.tensor(1.0, dtype=torch.float64), requires_grad=False)

    def encode_image(self, x):
        return nn.functional.normalize(self.image_proj(x), dim=-1)

    def encode_text(self, ids):
        return nn.functional.normalize((self.tokens(ids) * (ids != 0)[..., None]).sum(1), dim=-1)


class PadCollate:
    pad_token_id = 0

    def __call__(self, items):
        xs, caps = zip(*items)
        longest = max(len(c) for c in caps)
        return torch.stack(xs), torch.tensor([c + [0] * (longest - len(c)) for c in caps])


def _captions(n=N):
    g = torch.Generator().manual_seed(4)
    return [torch.randint(1, 12, (int(k),), generator=g).tolist() for k in torch.randint(1, 7, (n,), generator=g)]


def test_token_batches_padded_to_different_lengths(tmp_path):
    caps = _captions()
    loader = DataLoader(list(zip(X, caps)), batch_size=5, collate_fn=PadCollate())
    assert len({b[1].shape[1] for b in loader}) > 1
    ids = torch.tensor([c + [0] * (6 - len(c)) for c in caps])    # as collect_pairs pads them
    kw = dict(damping=0.1, batches=4, solver="exact", params=["image_proj.weight", "tokens.weight"])
    a = ef.ECIF(Tokens(), **kw).fit(X, ids)
    b = ef.ECIF(Tokens(), **kw).fit(loader)
    test = (XT, ids[:5])
    _assert_same({"total": a.influence(*test).total, "self": a.self_influence()},
                 {"total": b.influence(*test).total, "self": b.self_influence()})
    assert torch.equal(b.Y, ids) and b.source.shapes() == a.source.shapes()
    assert fit_key(b, loader) == fit_key(a, X, ids)                # the same fingerprint, streamed
    path = b.save(tmp_path / "s")
    assert torch.equal(ef.ECIF.load(path, Tokens(), X, ids).influence(*test).total, b.influence(*test).total)


# ------------------------------------------------------------------------------ state
def test_save_and_load_a_loader_fitted_ecif(tmp_path):
    from safetensors.torch import load_file

    loader = DataLoader(TensorDataset(X, Y), batch_size=5)
    kw = dict(damping=0.1, batches=4, solver="exact")
    ecif = ef.ECIF(_model(), **kw).fit(loader)
    want = ecif.influence(XT, YT).total
    ecif.self_influence()
    path = ecif.save(tmp_path / "state")                          # include_inputs=True: nothing to include
    assert not any(k.startswith("inputs.") for k in load_file(str(path / TENSORS)))
    head = json.loads((path / "state.json").read_text())
    assert head["data"]["from_loader"] and not head["data"]["included"]
    assert head["data"]["fingerprint"] == ef.ECIF(_model(), **kw).fit(X, Y).source.fingerprint()
    with pytest.raises(ECIFInputError, match="fitted from a DataLoader.*pass the same loader again"):
        ef.ECIF.load(path, ecif.model)
    again = ef.ECIF.load(path, ecif.model, loader)
    assert again.source.streamed and torch.equal(again.influence(XT, YT).total, want)
    assert torch.equal(again.self_influence(), ecif.self_influence())
    from_tensors = ef.ECIF.load(path, ecif.model, X, Y)            # or the tensors
    assert not from_tensors.source.streamed and torch.equal(from_tensors.influence(XT, YT).total, want)
    X2 = X.clone()
    X2[17, 2] += 1e-12
    with pytest.raises(ECIFInputError, match="training inputs differ"):
        ef.ECIF.load(path, ecif.model, DataLoader(TensorDataset(X2, Y), batch_size=5))
    with pytest.raises(ECIFInputError, match="training inputs differ"):
        ef.ECIF.load(path, ecif.model, DataLoader(TensorDataset(X[:-1], Y[:-1]), batch_size=5))
    # a tensor-fitted state saved without inputs takes the loader, and keeps streaming it
    path2 = ef.ECIF(_model(), **kw).fit(X, Y).save(tmp_path / "state2", include_inputs=False)
    assert ef.ECIF.load(path2, ecif.model, loader).source.streamed


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_clean_with_retraining_from_a_loader():
    kw = dict(damping=1.0, batches=4, solver="exact")
    train_kwargs = {"max_iter": 5}
    a = clean(ef.ECIF(_model(), **kw).fit(X, Y), [2, 5], retrain=True, train_kwargs=train_kwargs)
    b = clean(ef.ECIF(_model(), **kw).fit(DataLoader(TensorDataset(X, Y), batch_size=5)), [2, 5], retrain=True,
              train_kwargs=train_kwargs)
    for p, q in zip(a.retrained.parameters(), b.retrained.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------ peak memory, measured
def test_peak_memory_is_one_batch_not_the_raw_inputs(tmp_path):
    """Two fresh processes fit a 2048-pair dataset of 8192 float64 features per pair (128 MiB of raw inputs,
    generated lazily by the dataset) and query influence and self-influence: one on the DataLoader, one on the
    tensors collected from it (the oracle, and proof that the measure sees raw inputs). Peak resident memory is
    read from /proc (tests/loader_memory.py)."""
    script = Path(__file__).with_name("loader_memory.py")
    reports = {}
    for mode in ("loader", "tensors"):
        done = subprocess.run([sys.executable, str(script), mode, str(tmp_path / f"{mode}.pt")], capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        reports[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    raw = reports["loader"]["raw_input_bytes"]
    print(json.dumps(reports))
    assert reports["loader"]["streamed"] and not reports["tensors"]["streamed"]
    assert reports["tensors"]["peak_rise_bytes"] >= raw                     # holding the inputs is visible
    assert reports["loader"]["peak_rise_bytes"] <= raw / 4                   # streaming: about a batch
    got, want = torch.load(tmp_path / "loader.pt"), torch.load(tmp_path / "tensors.pt")
    _assert_same(want, got)

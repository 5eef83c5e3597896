"""The package imports and works when the compiled extension and triton are missing (pure-torch fallback)."""
import subprocess
import sys
import textwrap


def test_works_without_extension_and_triton():
    code = textwrap.dedent("""
        import sys
        sys.modules["ecif_fast._C"] = None   # import of the extension fails
        sys.modules["triton"] = None         # and triton is absent
        import torch, ecif_fast as ef
        from ecif_fast.kernels.ops import lse
        found = ef.backends()
        assert found["torch"] is True and found["cpp"] is not True and found["triton"] is not True, found
        U, V = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 3, dtype=torch.float64)
        row, col = lse(U, V, 2.0, 3)
        S = 2.0 * U[:3] @ V[:3].T
        assert torch.allclose(row[:3], torch.logsumexp(S, 1))
        try:
            lse(U, V, 2.0, 3, backend="cpp")
        except ef.BackendUnavailableError as e:
            assert "cpp" in str(e)
        else:
            raise AssertionError("forced unavailable backend did not raise")
        m = ef.LinearHeads(3, 3, 4).double()
        r = ef.ECIF(m, damping=1.0, batches=3, curvature="gauss-newton").fit(U, V).influence(U[:4], V[:4])
        assert r.total.shape == (7,) and torch.isfinite(r.total).all()
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")

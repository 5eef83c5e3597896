"""The README's Python example runs as written."""
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_example_runs():
    text = (ROOT / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    res, harmful, cleaned = scope["res"], scope["harmful"], scope["cleaned"]
    assert res.total.shape == (250,)
    assert bool((res.total[harmful] < 0).all())
    assert cleaned is not scope["model"]

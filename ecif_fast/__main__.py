"""``python -m ecif_fast`` is the ``ecif-fast`` command line (``python -m ecif_fast demo``)."""
from .cli.main import run

if __name__ == "__main__":
    raise SystemExit(run())

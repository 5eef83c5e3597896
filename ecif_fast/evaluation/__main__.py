"""``python -m ecif_fast.evaluation``: the evaluation suite (:mod:`ecif_fast.evaluation.main`)."""
from .main import main

if __name__ == "__main__":
    main()

"""The evaluation suite behind ``benchmarks/evaluate.py`` and EVALUATION.md (see ``benchmarks/README.md``)."""

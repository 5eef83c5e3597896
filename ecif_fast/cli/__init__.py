"""The ``ecif-fast`` command line: train LinearHeads on feature files, then value, detect, trace and clean.

Entry point: :func:`ecif_fast.cli.main.main`. Kept free of imports so that
``python -m ecif_fast.cli.main`` does not import the module twice.
"""

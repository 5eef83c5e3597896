"""The evaluation suite behind EVALUATION.md: ECIF next to its peers on the paper's experiments.

``python -m ecif_fast.evaluation --quick|--full --out DIR`` (:mod:`ecif_fast.evaluation.main`) runs them; it needs
the ``eval`` extra (``pip install "ecif-fast[eval]"``). :mod:`.problems` and :mod:`.lora_problem` build the
trained problems and their retraining, :mod:`.digits` the detection / cleaning setting, :mod:`.methods` the
influence methods, :mod:`.peers` the TRAK, dattri and kronfluence adapters, one module per experiment
(:mod:`.fidelity`, :mod:`.detection`, :mod:`.cleaning`, :mod:`.ablations`, :mod:`.runtime`), :mod:`.stats`
bootstrap intervals, :mod:`.suite` the quick / full modes and :mod:`.report` EVALUATION.md.
"""

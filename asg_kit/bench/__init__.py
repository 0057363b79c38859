"""Benchmarks behind ``asgkit bench``: the paper's understanding suite through lmms-eval,
GenEval (the official evaluator or a portable re-implementation of its rules), and the
shapes world's ground-truth benchmarks, with results set beside the published numbers.

Modules import their heavy optional dependencies (lmms-eval, detectors) only when used.
"""

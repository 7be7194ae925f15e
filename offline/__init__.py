"""Everything that does not serve: training and model export, evaluation, benchmarks, the
reliability drill, catalog hygiene reports, the demo. ``python -m offline`` lists the tools.

These modules use the serving packages (and torch, matplotlib, scikit-learn: the ``train`` and
``bench`` extras); nothing in a serving package imports them.
"""

"""``khot bench``: every top-k method of khot and its installed peers, measured side by side.

=================  ================================================================
module             concept
=================  ================================================================
``measure``        timing and peak-memory primitives, torch.topk baselines (also used
                   by the scripts in ``benchmarks/``)
``suites``         the four suites: inputs, methods, quality metrics
``peers``          entmax, difftopk, diffsort, torchsort, adapted from their installed code
``runner``         budgets, skips, errors, progress bar, the CSV row by row
``report``         the CSV schema and report.md with its computed summary
``plots``          PNG plots (matplotlib, optional)
=================  ================================================================

The command line lives in :mod:`khot.cli`; nothing here is imported by ``import khot``.
"""

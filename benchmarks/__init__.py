"""The benchmarks: each script runs by path (``python benchmarks/tasks.py``, as docs/benchmarks.md
writes it) or as a module (``python -m benchmarks.tasks``); the parts they share import as
``benchmarks.<module>`` from the repository root. A script run by path puts the repository root
in place of its own folder on ``sys.path`` (its first lines), so that ``benchmarks/export.py``
never shadows the ``export`` package and no module is loaded by file path."""

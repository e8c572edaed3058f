"""Setup scripts (``python scripts/fetch_tasks.py``); a package so that tests import them as ``scripts.<name>``."""

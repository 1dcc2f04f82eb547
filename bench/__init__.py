"""Benchmarks: ``python -m bench gradient``. See ``bench/common.py`` for how floors are measured."""

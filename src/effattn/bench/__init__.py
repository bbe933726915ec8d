"""The benchmark: speed, memory and accuracy of every registered attention method.

``effattn bench`` (see :mod:`effattn.bench.command`) runs the sweep described by a
:class:`~effattn.bench.config.BenchConfig` (the shipped ``default.toml`` unless told
otherwise), each timed case in its own subprocess, and writes ``results.json``,
``report.md`` and PNG plots.  :func:`effattn.bench.runner.run_bench` is the library entry.
"""

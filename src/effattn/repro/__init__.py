"""``effattn repro``: the literature's quality tables (Reformer Table 2, LRA ListOps,
Zoology MQAR) reproduced at CPU scale with effattn's training loop, tasks and methods.

Modules: :mod:`~effattn.repro.command` (the CLI), :mod:`~effattn.repro.reformer`,
:mod:`~effattn.repro.listops`, :mod:`~effattn.repro.mqar` (the experiments),
:mod:`~effattn.repro.published` (the papers' figures), :mod:`~effattn.repro.tables`
(markdown), :mod:`~effattn.repro.plots` (PNG), :mod:`~effattn.repro.harness` (train,
evaluate, measure, write), :mod:`~effattn.repro.data` (shared example pools).
"""

from effattn.repro.command import register

__all__ = ["register"]

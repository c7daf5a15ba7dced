"""The search room: prune a model until every device of a fleet meets its own targets, measured on the devices.

Entry points in :mod:`host.search.run` (``start``, ``resume``); the algorithms in :mod:`host.search.algos` (one
module each, plain arithmetic); the rest (options, on-disk state, model space, evaluator, driver, outcome, data)
beside them. This room may import :mod:`host.fleet`, :mod:`host.results`, :mod:`host.files`, :mod:`host.fmt`,
:mod:`edgeprune` and :mod:`agent.schema`, never :mod:`host.commands` or :mod:`host.cli`.
"""

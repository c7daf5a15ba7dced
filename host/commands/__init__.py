"""The commands' library functions: ``demo`` (the whole loop on the local device), ``benchmark`` (one artifact on
many devices) and ``pruning`` (one model → pruned, recovered, verified artifacts).

Each takes an options object, reports progress through a callback and returns plain data; it never prints and
never exits. :mod:`host.cli` does that. They build with :mod:`edgeprune`, measure through :mod:`host.fleet` and
record through :mod:`host.results`; the search command's library is :mod:`host.search`.
"""

"""What the devices measured, kept and read back: the results store and what is built from it.

    store.py        the store (SQLite by default, PostgreSQL): runs, devices, artifacts, measurements, search
                    evaluations, each recorded in its own transaction; RunRecorder for one command's run
    tables.py       its SQLAlchemy tables, and how an agent report becomes a measurements row
    frames.py       the store as pandas DataFrames; a run exported as Parquet or CSV
    provenance.py   the host side of a run's provenance (versions, git commit, command line, seeds)
    report/         the self-contained HTML report of one run (data, figures, HTML sections)
    regress/        the release gate: a candidate run against a baseline run (statistics, checks, JUnit, summary)

Contract: library code only. It imports :mod:`edgeprune` (errors), :mod:`agent.schema`, :mod:`host.files` and
:mod:`host.fmt`, never the search, the commands or the CLI; it raises (``UsageError``, ``StoreError``) and never
exits; the command line (:mod:`host.cli`) parses the arguments and prints.
"""

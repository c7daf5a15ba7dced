"""``python -m host.cli``: the same as the ``edgeprune`` command."""
from host.cli import main

raise SystemExit(main())

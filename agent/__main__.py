"""``python -m agent``: see :mod:`agent` for the commands."""
from agent.cli import main

if __name__ == "__main__":
    raise SystemExit(main())

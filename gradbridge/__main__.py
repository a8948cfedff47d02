"""``python -m gradbridge``: the command line (see :mod:`gradbridge._cli`)."""

from ._cli import main

raise SystemExit(main())

"""``python -m infopt ...`` runs the ``infopt`` command line (see :mod:`infopt.cli`)."""

from infopt.cli import main

raise SystemExit(main())

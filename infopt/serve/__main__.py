"""``python -m infopt.serve --model NAME ...``: the same as ``infopt serve``."""

from infopt.serve.cli import main

raise SystemExit(main())

#!/usr/bin/env bash
# Set up .venv/ and run the test suite (CPU: Triton kernels run under TRITON_INTERPRET=1).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -ra "$@"

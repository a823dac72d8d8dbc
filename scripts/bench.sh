#!/usr/bin/env bash
# Main job: set up .venv/ and run `infopt bench` on the embedded default model
# (SmolLM2-135M-Instruct). Extra arguments go to `infopt bench`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/infopt bench "$@"

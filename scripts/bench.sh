#!/usr/bin/env bash
# Main job: set up .venv/ and run `infopt bench` on the embedded default model
# (SmolLM2-135M-Instruct): the default rows (baseline, int8, int4, paged-prefix,
# spec-prompt-lookup) with their results in bench.json and a speed-versus-quality plot in
# bench.png at the repo root. Extra arguments go to `infopt bench` (e.g. --configs, --json,
# --plot; a later --json / --plot overrides these).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
exec .venv/bin/infopt bench --json bench.json --plot bench.png "$@"

#!/usr/bin/env bash
# Install everything the tests need (scripts/install.sh --all), then run pytest.
#
#   scripts/test.sh                     the whole suite
#   scripts/test.sh tests/core -x -q    arguments go to pytest unchanged
#
# SKIP_INSTALL=1 skips the install step when the environment is already up to date.
# VENV=/path selects the virtual environment, as in scripts/install.sh.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
cd "$root"

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  VENV="$venv" scripts/install.sh --all
fi

exec "$venv/bin/python" -m pytest "$@"

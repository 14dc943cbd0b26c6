#!/usr/bin/env bash
# Run the demo: install the serving environment, index the demo catalog with the default
# model, and serve the search page and the API on http://127.0.0.1:8000/ (Ctrl-C stops it).
#
#   scripts/demo.sh
#
# Environment (all optional):
#   IDML_BUNDLE            model bundle folder (default models/default)
#   IDML_INDEX             catalog folder (default var/demo-index); indexed on the first run,
#                          re-embedded when IDML_BUNDLE contains another model, else reused
#   IDML_CATALOG_MANIFEST  CSV manifest to index (default demo/catalog.csv)
#   IDML_HOST, IDML_PORT   address to serve on (default 127.0.0.1:8000)
#   SKIP_INSTALL=1         skip scripts/install.sh --serve
#   VENV                   virtual environment (default .venv), as in scripts/install.sh
# Every other IDML_* variable of idml-serve (IDML_API_KEY, IDML_THREADS, ...) passes through.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
cd "$root"

export IDML_BUNDLE="${IDML_BUNDLE:-$root/models/default}"
export IDML_INDEX="${IDML_INDEX:-$root/var/demo-index}"
export IDML_CATALOG_MANIFEST="${IDML_CATALOG_MANIFEST:-$root/demo/catalog.csv}"
export IDML_HOST="${IDML_HOST:-127.0.0.1}"
export IDML_PORT="${IDML_PORT:-8000}"
# Readable logs in a terminal; the server's own default is JSON lines.
export IDML_LOG_FORMAT="${IDML_LOG_FORMAT:-text}"

if [ "${SKIP_INSTALL:-0}" != "1" ]; then
  VENV="$venv" scripts/install.sh --serve
fi
export PATH="$venv/bin:$PATH"

mkdir -p "$(dirname "$IDML_INDEX")"
scripts/ensure-index.sh

url_host="$IDML_HOST"
case "$url_host" in
  0.0.0.0 | "::") url_host=127.0.0.1 ;;
esac
url="http://$url_host:$IDML_PORT"
example="$(awk -F, 'NR == 2 { print $1; exit }' "$IDML_CATALOG_MANIFEST")"
case "$example" in
  /*) example_path="$example" ;;
  *) example_path="$(dirname "$IDML_CATALOG_MANIFEST")/$example" ;;
esac
case "$example_path" in
  "$root"/*) example_path="${example_path#"$root"/}" ;;
esac

cat <<MESSAGE

Search page:  $url/
API docs:     $url/docs
Search with curl:
  curl -F image=@$example_path '$url/search?k=5'

Press Ctrl-C to stop the server.

MESSAGE

exec idml-serve

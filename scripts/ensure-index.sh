#!/usr/bin/env bash
# Make sure the catalog at IDML_INDEX is embedded with the bundle at IDML_BUNDLE.
#
#   no catalog yet              build it from IDML_CATALOG_FOLDER (every image in the folder)
#                               or else IDML_CATALOG_MANIFEST (CSV: path,label,id,...;
#                               default demo/catalog.csv)
#   catalog of another model    re-embed it with the bundle (`idml-index reembed`), which keeps
#                               every item, including the ones added through the API since
#   catalog of this model       leave it as it is
#
# Runs before the server starts: from scripts/demo.sh, and as the `index` job in
# docker-compose.yml. Needs idml-index and python of the serving install on PATH.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bundle="${IDML_BUNDLE:?set IDML_BUNDLE to the model bundle folder}"
index="${IDML_INDEX:?set IDML_INDEX to the catalog folder}"
manifest="${IDML_CATALOG_MANIFEST:-$root/demo/catalog.csv}"
folder="${IDML_CATALOG_FOLDER:-}"

if [ ! -f "$bundle/model.onnx" ] || [ ! -f "$bundle/model.json" ]; then
  echo "ensure-index: $bundle is not a model bundle (model.onnx and model.json are missing);" \
    "set IDML_BUNDLE to a bundle folder such as models/default" >&2
  exit 2
fi

# Prints "<bundle model id> <catalog model id or none>". An unreadable bundle or catalog
# stops the script with the library's message.
model_ids="$(python - "$bundle" "$index" <<'PY'
import sys
from pathlib import Path

from index.bundle import BundleError, load_bundle
from index.catalog import Catalog
from index.catalog_types import CatalogError

bundle_path, index_path = sys.argv[1], Path(sys.argv[2])
try:
    bundle = load_bundle(bundle_path)
    catalog_model = "none"
    if (index_path / "catalog.json").exists():
        catalog = Catalog.open(index_path, None, create=False, read_only=True)
        try:
            catalog_model = catalog.model_id
        finally:
            catalog.close()
except (BundleError, CatalogError) as error:
    sys.exit(f"ensure-index: {error}")
print(bundle.model_id, catalog_model)
PY
)"
read -r bundle_model catalog_model <<<"$model_ids"

# Containers see the host's CPU count, so honour the server's thread setting when it is set.
tool_args=()
if [ -n "${IDML_THREADS:-}" ]; then
  tool_args+=(--threads "$IDML_THREADS")
fi
# A progress bar is noise in `docker compose logs`.
if [ ! -t 2 ]; then
  tool_args+=(--no-progress)
fi

if [ "$catalog_model" = "none" ]; then
  if [ -n "$folder" ]; then
    source_args=(--folder "$folder")
  else
    if [ ! -f "$manifest" ]; then
      echo "ensure-index: catalog manifest $manifest not found; set IDML_CATALOG_MANIFEST" \
        "to a CSV file or IDML_CATALOG_FOLDER to an image folder" >&2
      exit 2
    fi
    source_args=(--manifest "$manifest")
  fi
  echo "ensure-index: building catalog $index with model $bundle_model from ${source_args[*]}"
  idml-index build --bundle "$bundle" --index "$index" "${source_args[@]}" "${tool_args[@]}"
elif [ "$catalog_model" != "$bundle_model" ]; then
  echo "ensure-index: catalog $index has model $catalog_model; re-embedding it with $bundle_model"
  idml-index reembed --index "$index" --bundle "$bundle" "${tool_args[@]}"
else
  echo "ensure-index: catalog $index is up to date (model $bundle_model)"
fi

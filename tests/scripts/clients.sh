#!/usr/bin/env bash
# Installs Segment's official libraries for the Tracking API tests, once, into tools/clients:
# a Python virtualenv with segment-analytics-python (PyPI) and node_modules with
# @segment/analytics-node (npm), at the versions pinned in tests/clients/. Prints the two
# environment variables the tests read.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
clients="$root/tests/clients"
dir=${SLUICE_TOOLS_DIR:-$root/tools}/clients
mkdir -p "$dir"
stamp=$(cat "$clients/requirements.txt" "$clients/package.json" "$clients/package-lock.json" | sha1sum | cut -c1-12)
if [ "$(cat "$dir/installed" 2>/dev/null)" != "$stamp" ]; then
  echo "clients.sh: installing Segment's Python and Node libraries into $dir" >&2
  rm -rf "$dir/venv" "$dir/node_modules"
  python3 -m venv "$dir/venv"
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check -r "$clients/requirements.txt"
  cp "$clients/package.json" "$clients/package-lock.json" "$dir/"
  (cd "$dir" && npm ci --silent --no-audit --no-fund)
  echo "$stamp" >"$dir/installed"
fi
echo "export SLUICE_TEST_PYTHON=$dir/venv/bin/python"
echo "export SLUICE_TEST_NODE_PATH=$dir/node_modules"

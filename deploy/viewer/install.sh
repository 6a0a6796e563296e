#!/usr/bin/env bash
# Install the viewer stack's npm parts into git-ignored paths of deploy/viewer; idempotent, well under
# a second when they are already there.
#
#   node_modules/playwright-core   the browser driver (npm ci from package-lock.json)
#   ohif/                          OHIF's built viewer: dist/ of the @ohif/app tarball pinned in
#                                  package.json ("ohif"), its sha512 checked. Only the tarball is fetched:
#                                  its npm dependencies are build-time ones (and some are not published).
set -euo pipefail
cd "$(dirname "$0")"

lock_sum=$(sha256sum package-lock.json | cut -c1-16)
if [ -f "node_modules/.segnode-$lock_sum" ]; then
  echo "viewer: playwright-core present"
else
  echo "viewer: npm ci (playwright-core)"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
  touch "node_modules/.segnode-$lock_sum"
fi

read -r name version integrity < <(node -e \
  'const o = require("./package.json").ohif; console.log(o.package, o.version, o.integrity)')
if [ -f ohif/.integrity ] && [ "$(cat ohif/.integrity)" = "$integrity" ]; then
  echo "viewer: $name@$version present"
else
  echo "viewer: fetching $name@$version (tarball only)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "$name@$version" >/dev/null)
  tarball=$(ls "$tmp"/*.tgz)
  got="sha512-$(openssl dgst -sha512 -binary "$tarball" | base64 -w0)"
  if [ "$got" != "$integrity" ]; then
    echo "viewer: $name@$version tarball has $got, package.json pins $integrity" >&2
    exit 1
  fi
  rm -rf ohif
  mkdir -p ohif
  tar -xzf "$tarball" -C ohif --strip-components=2 package/dist
  echo "$integrity" > ohif/.integrity
fi

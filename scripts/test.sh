#!/usr/bin/env bash
# Sets this machine up (scripts/setup.sh) and runs every check and test.
# The VM tests boot real QEMU guests; they share the kernel and image that
# setup prepared and run in parallel where it is safe.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PATH="/usr/local/go/bin:$PATH"

bash scripts/setup.sh

# Test-only dependency: the image tests build OCI images around Debian's
# static busybox.
if [ ! -x /bin/busybox ]; then
	echo "installing busybox-static for the image tests"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends busybox-static ||
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends busybox-static; }
fi

echo "== gofmt and go vet"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './ts/*'))
if [ -n "$unformatted" ]; then
	echo "gofmt needed on:" >&2
	echo "$unformatted" >&2
	exit 1
fi
CGO_ENABLED=0 go vet ./...

echo "== go test"
CGO_ENABLED=0 go test -count=1 -timeout 20m ./...

echo "== TypeScript client"
(cd ts && npm ci --no-audit --no-fund && npm test)

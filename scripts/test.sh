#!/usr/bin/env bash
# Sets this machine up (scripts/setup.sh) and runs every check and test.
# The VM tests boot real QEMU guests; they share the kernel and image that
# setup prepared and run in parallel where it is safe.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

# Installing packages and building images need root, and so do the tests
# that unpack image layers with their owners. As root (a fresh Debian
# machine has no sudo) run as is; otherwise start again under sudo.
if [ "$(id -u)" -ne 0 ]; then
	command -v sudo >/dev/null 2>&1 || { echo "$(basename "$0"): run as root, or install sudo" >&2; exit 1; }
	exec sudo env "PATH=/usr/local/go/bin:$PATH" ${CI:+CI=$CI} ${SMOLVM_DATA_DIR:+SMOLVM_DATA_DIR=$SMOLVM_DATA_DIR} ${PORT:+PORT=$PORT} bash "$repo/scripts/$(basename "$0")" "$@"
fi
export PATH="/usr/local/go/bin:$PATH"
# Under sudo, git may refuse a checkout owned by another user; the builds
# the tests make then go without version stamping rather than fail.
if ! git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
	export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"
fi

# Each stage's heading says how long the run has taken so far.
stage() { printf '== %s (at %dm%02ds)\n' "$1" $((SECONDS / 60)) $((SECONDS % 60)); }

bash scripts/setup.sh

# Test-only dependencies: the image tests build OCI images around Debian's
# static busybox; the agent API's drift test regenerates its code with
# protoc; the shell test drives a terminal with tmux; the dashboard's tests
# drive Debian's Chromium, and its build (checked against the committed
# one) and the TypeScript client need Node.js and npm; the libkrun tests
# compile a stand-in libkrun.so with the C compiler.
need=()
[ -x /bin/busybox ] || need+=(busybox-static)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v tmux >/dev/null 2>&1 || need+=(tmux)
[ -x /usr/bin/chromium ] || need+=(chromium)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
if [ ${#need[@]} -gt 0 ]; then
	echo "installing ${need[*]} for the tests"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" ||
		{ apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"; }
fi

stage "dashboard build tools"
(cd internal/ui/web && npm ci --no-audit --no-fund && npm run typecheck)

stage "gofmt and go vet"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './ts/*'))
if [ -n "$unformatted" ]; then
	echo "gofmt needed on:" >&2
	echo "$unformatted" >&2
	exit 1
fi
CGO_ENABLED=0 go vet -tags faults ./...

stage "go test"
CGO_ENABLED=0 go test -count=1 -timeout 20m ./...

# The fault suite (internal/faults, build tag faults): servers, VMMs and
# network processes killed mid-work, a host disk that fills up, guests that
# fork-bomb, exhaust memory or flood their output, and 300
# create/exec/delete cycles checked for leaks. It runs on its own: guests
# at their worst beside the other packages' VMs would test the machine's
# load more than smolvm.
stage "fault suite"
CGO_ENABLED=0 go test -tags faults -count=1 -timeout 20m ./internal/faults

# A short run of every fuzz target (their seed corpora already ran above):
# the agent's protocol, image layers and configs, the API's requests.
stage "fuzz, ${FUZZTIME:-5s} a target"
CGO_ENABLED=0 FUZZTIME=${FUZZTIME:-5s} bash scripts/fuzz.sh

stage "TypeScript client"
(cd ts && npm ci --no-audit --no-fund && npm test)

# Its own module, so the main one does not carry Kubernetes. The first build
# of the control plane takes 10 to 20 minutes on 2 cores; later ones reuse
# the Go build cache. vet without cgo: with it, vet rebuilds Kubernetes.
stage "Kubernetes end-to-end"
bash deploy/kubernetes/e2e/build.sh
(cd deploy/kubernetes/e2e && CGO_ENABLED=0 go vet ./... && CGO_ENABLED=0 go test -count=1 -timeout 30m ./...)
stage "done"

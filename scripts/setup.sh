#!/usr/bin/env bash
# Prepares a fresh Debian host to build and run smolvm: installs what the
# build needs, builds bin/smolvm, bin/smolvm-agent, bin/smolvm-net and bin/smolvm-jail, then runs
# `bin/smolvm setup`, which installs QEMU and the filesystem tools, imports the
# guest kernel and builds the default image. Safe to run again; a second run
# only rebuilds the binaries.
#
# Run as root, or as a user with sudo. Environment passed on to smolvm:
# SMOLVM_DATA_DIR, SMOLVM_DEBIAN_MIRROR, SMOLVM_VERBOSE.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PATH="/usr/local/go/bin:$PATH"

if [ "$(id -u)" -eq 0 ]; then
	sudo=()
elif command -v sudo >/dev/null 2>&1; then
	sudo=(sudo)
else
	echo "setup.sh: run as root, or install sudo" >&2
	exit 1
fi

# apt_install installs those of the given Debian packages not installed yet,
# refreshing the package lists once if the install fails without them.
apt_install() {
	local missing=() p
	for p in "$@"; do
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
	done
	[ "${#missing[@]}" -eq 0 ] && return 0
	if ! command -v apt-get >/dev/null 2>&1; then
		echo "setup.sh: install these with your package manager: ${missing[*]}" >&2
		exit 1
	fi
	echo "installing ${missing[*]}"
	local install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}")
	"${sudo[@]}" "${install[@]}" || { "${sudo[@]}" apt-get update -q && "${sudo[@]}" "${install[@]}"; }
}

# The build fetches Go modules over HTTPS.
apt_install ca-certificates

if ! command -v go >/dev/null 2>&1; then
	echo "setup.sh: Go not found; install Go 1.26 into /usr/local/go (https://go.dev/dl/)" >&2
	exit 1
fi

# Version stamping needs a working git; without one (or in a checkout git
# refuses as another user's) build without it rather than fail.
buildflags=()
if ! git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then
	buildflags+=(-buildvcs=false)
fi

mkdir -p bin
echo "building bin/smolvm, bin/smolvm-agent, bin/smolvm-net, bin/smolvm-jail and bin/smolvm-krun"
# Without symbol tables: the agent rides in every guest's initramfs, and
# panics still name their functions.
CGO_ENABLED=0 go build "${buildflags[@]}" -ldflags="-s -w" -o bin/ ./cmd/...

if [ "$(id -u)" -eq 0 ]; then
	exec bin/smolvm setup
fi

# Packages and the image build need root. Keep the invoking user's data
# directory (smolvm hands it back to the sudo user afterwards).
data=${SMOLVM_DATA_DIR:-${XDG_DATA_HOME:-$HOME/.local/share}/smolvm}
env_args=("SMOLVM_DATA_DIR=$data" "PATH=$PATH")
for v in SMOLVM_DEBIAN_MIRROR SMOLVM_VERBOSE http_proxy https_proxy no_proxy; do
	if [ -n "${!v:-}" ]; then
		env_args+=("$v=${!v}")
	fi
done
exec sudo env "${env_args[@]}" "$repo/bin/smolvm" setup

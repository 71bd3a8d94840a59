#!/usr/bin/env bash
# The main job, end to end on a fresh Debian machine: set up, start the HTTP
# server, create a sandbox, run a command in it, print the result, clean up.
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
bash scripts/setup.sh >&2
if ! command -v curl >/dev/null; then
	install=(env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends curl)
	"${install[@]}" >&2 || { apt-get update -q >&2 && "${install[@]}" >&2; }
fi

port=${PORT:-8000}
log=$(mktemp)
bin/smolvm server start --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
server=$!
id=""
cleanup() {
	[ -n "$id" ] && curl -s -X DELETE "http://127.0.0.1:$port/sandboxes/$id" >/dev/null || true
	kill "$server" 2>/dev/null || true
	wait "$server" 2>/dev/null || true
	rm -f "$log"
}
trap cleanup EXIT
for _ in $(seq 100); do
	grep -q "OpenAPI spec" "$log" && break
	kill -0 "$server" 2>/dev/null || { cat "$log" >&2; exit 1; }
	sleep 0.1
done
cat "$log"

echo "+ POST /sandboxes"
created=$(curl -sS -X POST "http://127.0.0.1:$port/sandboxes" \
	-H "Content-Type: application/json" \
	-d '{"memory":512,"disk_size":1024}')
echo "$created"
id=$(printf '%s' "$created" | sed -n 's/.*"id":"\(vm-[0-9a-f]*\)".*/\1/p')
[ -n "$id" ] || exit 1

echo "+ POST /sandboxes/$id/exec"
curl -sS -X POST "http://127.0.0.1:$port/sandboxes/$id/exec" \
	-H "Content-Type: application/json" \
	-d '{"command":"python3 --version; uname -a","timeout":30,"shell":"login"}'
echo

#!/usr/bin/env bash
# Boots one sandbox per backend on this host, runs a command in it and
# deletes it: the check to run on a machine with working KVM, where the
# firecracker and libkrun backends can really boot (the test suite checks
# them only against their documented interfaces). Backends this host cannot
# run are reported as skipped with the reason, not as failures.
#
#   bash scripts/verify-backends.sh            # every backend
#   bash scripts/verify-backends.sh firecracker
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
smolvm=${SMOLVM:-$repo/bin/smolvm}
[ -x "$smolvm" ] || { echo "no $smolvm: run scripts/setup.sh first (or set SMOLVM)" >&2; exit 2; }
backends=("$@")
[ ${#backends[@]} -gt 0 ] || backends=(qemu firecracker libkrun)

failed=0
for b in "${backends[@]}"; do
	reason=$("$smolvm" doctor --json 2>/dev/null | python3 -c '
import json, sys
name = "backend " + sys.argv[1]
for c in json.load(sys.stdin)["data"]["checks"]:
    if c["name"] == name and c["status"] != "ok":
        print(c["detail"])
' "$b")
	if [ -n "$reason" ]; then
		echo "$b: skipped: $reason"
		continue
	fi
	start=$(date +%s.%N)
	# JSON on stdout; progress (a template's first build) on stderr.
	errf=$(mktemp)
	out=$("$smolvm" sandbox create --backend "$b" --memory 256 --json 2>"$errf")
	id=$(printf '%s' "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data"]["id"])' 2>/dev/null)
	if [ -z "$id" ]; then
		echo "$b: FAILED to create: $out $(cat "$errf")"
		rm -f "$errf"
		failed=1
		continue
	fi
	rm -f "$errf"
	booted=$(date +%s.%N)
	res=$("$smolvm" sandbox exec "$id" -- uname -sr 2>&1)
	code=$?
	"$smolvm" sandbox delete "$id" >/dev/null 2>&1 || echo "$b: could not delete $id" >&2
	if [ $code -ne 0 ]; then
		echo "$b: FAILED to run a command (exit $code): $res"
		failed=1
		continue
	fi
	printf '%s: ok: created in %.2f s; the guest says %s\n' "$b" "$(awk -v a="$start" -v b="$booted" 'BEGIN{print b-a}')" "$res"
done
exit $failed

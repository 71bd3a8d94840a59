#!/usr/bin/env bash
# Runs every Go fuzz target in the module for a short time each. go test
# fuzzes one target per run, so the targets run one after another; each
# first replays its seed corpus (testdata/fuzz/<target>), so a committed
# failing input fails the run too. New failures are written there by go
# test. Exits non-zero if any target failed.
#
#   FUZZTIME          time per target (default 10s), as go test -fuzztime
#   FUZZPARALLEL      fuzzing workers per target (default 2)
#   FUZZMINIMIZETIME  time to shrink each new input (default 2s; go test's
#                     own 60s would leave short runs little time to fuzz)
#   arguments         run only the targets whose name contains one of them
#
# The layer and image targets need root, as unpacking image layers does:
# without it the image config target skips and layers unpack with errors.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
export PATH="/usr/local/go/bin:$PATH"

fuzztime=${FUZZTIME:-10s}
parallel=${FUZZPARALLEL:-2}
minimize=${FUZZMINIMIZETIME:-2s}

# "package-dir target" for every func FuzzXxx(f *testing.F) in a test file.
targets=()
while IFS= read -r match; do
	file=${match%%:*}
	name=$(sed -E 's/^func (Fuzz[A-Za-z0-9_]*).*/\1/' <<<"${match#*:}")
	targets+=("./$(dirname "${file#./}") $name")
done < <(grep -rE --include='*_test.go' --exclude-dir=.git --exclude-dir=node_modules \
	'^func Fuzz[A-Za-z0-9_]*\(f \*testing\.F\)' . | sort)

if [ ${#targets[@]} -eq 0 ]; then
	echo "no fuzz targets found" >&2
	exit 1
fi

out=$(mktemp)
trap 'rm -f "$out"' EXIT
failed=()
ran=0
for t in "${targets[@]}"; do
	pkg=${t% *}
	name=${t#* }
	if [ $# -gt 0 ]; then
		want=false
		for a in "$@"; do
			if [[ $name == *"$a"* ]]; then want=true; fi
		done
		$want || continue
	fi
	ran=$((ran + 1))
	echo "== $name in $pkg for $fuzztime"
	ok=false
	for try in 1 2; do
		if go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" -fuzzminimizetime "$minimize" \
			-parallel "$parallel" "$pkg" 2>&1 | tee "$out"; then
			ok=true
			break
		fi
		# go's fuzzing engine sometimes ends a run that found nothing
		# with "context deadline exceeded" when the time is up while a
		# worker is busy: no input failed, so run the target again. A
		# real finding names the input it wrote, and is not retried.
		if grep -q 'Failing input written' "$out" || ! grep -q '^    context deadline exceeded$' "$out"; then
			break
		fi
		echo "== $name: the fuzzing engine timed out at the end of its run with no failing input; again"
	done
	$ok || failed+=("$name ($pkg)")
done

if [ $ran -eq 0 ]; then
	echo "no fuzz target matches: $*" >&2
	exit 1
fi
if [ ${#failed[@]} -gt 0 ]; then
	echo "== failed:" >&2
	printf '   %s\n' "${failed[@]}" >&2
	exit 1
fi
echo "== $ran fuzz targets passed"

#!/usr/bin/env bash
# Builds the control plane binaries that the cluster package's tests run:
# kube-apiserver, kube-scheduler and kube-controller-manager from the
# k8s.io/kubernetes module, and agent-sandbox-controller from the
# sigs.k8s.io/agent-sandbox module, at the versions pinned in go.mod. It
# also copies the agent-sandbox CRD manifests next to them.
#
# Usage: build.sh [OUTPUT_DIR]   (default: the bin directory beside this script)
#
# The first build compiles all of Kubernetes and takes around twenty minutes
# on two cores; with a warm Go build cache it takes seconds and leaves
# up-to-date binaries untouched.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-$here/bin}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$here"

start=$SECONDS
step() { printf '==> [%3ds] %s\n' "$((SECONDS - start))" "$*"; }

export CGO_ENABLED=0

module_field() { go list -m -f "$2" "$1"; }
kube_version="$(module_field k8s.io/kubernetes '{{.Version}}')"
sandbox_version="$(module_field sigs.k8s.io/agent-sandbox '{{.Version}}')"
sandbox_dir="$(module_field sigs.k8s.io/agent-sandbox '{{.Dir}}')"
if [[ -z "$sandbox_dir" ]]; then
	go mod download sigs.k8s.io/agent-sandbox
	sandbox_dir="$(module_field sigs.k8s.io/agent-sandbox '{{.Dir}}')"
fi

# Stamp versions the way the upstream release builds do, so that
# `kubectl version` and /version report the real release. No build date:
# it would change every build and defeat the build cache.
kube_major="${kube_version#v}"
kube_major="${kube_major%%.*}"
kube_minor="${kube_version#v*.}"
kube_minor="${kube_minor%%.*}"
kube_ldflags="-s -w"
kube_ldflags+=" -X k8s.io/component-base/version.gitVersion=$kube_version"
kube_ldflags+=" -X k8s.io/component-base/version.gitMajor=$kube_major"
kube_ldflags+=" -X k8s.io/component-base/version.gitMinor=$kube_minor"
kube_ldflags+=" -X k8s.io/component-base/version.gitTreeState=clean"
sandbox_ldflags="-s -w -X sigs.k8s.io/agent-sandbox/internal/version.gitVersion=$sandbox_version"

step "building kube-apiserver, kube-scheduler, kube-controller-manager ($kube_version) into $out"
go build -trimpath -ldflags "$kube_ldflags" -o "$out/" \
	./cmd/kube-apiserver ./cmd/kube-scheduler ./cmd/kube-controller-manager

step "building agent-sandbox-controller ($sandbox_version) into $out"
go build -trimpath -ldflags "$sandbox_ldflags" -o "$out/" \
	sigs.k8s.io/agent-sandbox/cmd/agent-sandbox-controller

step "copying agent-sandbox CRDs from $sandbox_dir/k8s/crds"
crds="$out/agent-sandbox-crds"
rm -rf "$crds"
mkdir -p "$crds"
cp "$sandbox_dir"/k8s/crds/*.yaml "$crds/"
chmod 0644 "$crds"/*.yaml # the module cache is read-only

step "done:"
ls -l "$out"

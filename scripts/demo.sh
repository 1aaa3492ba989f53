#!/usr/bin/env bash
# The main job on embedded defaults: build a small pool of real qcow2
# chains with qemu-img in a temporary folder and show what xlsnap reads.
set -euo pipefail
xlsnap=$(cd "$(dirname "$0")/.." && pwd)/bin/xlsnap
work=$(mktemp -d /tmp/xlsnap-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "a pool with a raw base, two qcow2 overlays and an internal snapshot"
mkdir pool elsewhere
qemu-img create -q -f raw pool/base.raw 64M
qemu-io -f raw -c 'write -P 0x11 0 1M' pool/base.raw >/dev/null
qemu-img create -q -f qcow2 -F raw -b base.raw pool/mid.qcow2
qemu-io -f qcow2 -c 'write -P 0x22 1M 1M' pool/mid.qcow2 >/dev/null
qemu-img snapshot -c before-top pool/mid.qcow2
qemu-img create -q -f qcow2 -F qcow2 -b mid.qcow2 pool/top.qcow2
"$xlsnap" chain pool/top.qcow2
"$xlsnap" chain --json pool/top.qcow2

step "a backing reference that leaves the pool is refused"
qemu-img create -q -f qcow2 elsewhere/secret.qcow2 64M
qemu-img create -q -f qcow2 -F qcow2 -b ../elsewhere/secret.qcow2 pool/escape.qcow2
if "$xlsnap" chain pool/escape.qcow2; then echo "demo: expected a refusal" >&2; exit 1; fi

echo
echo "demo: done"

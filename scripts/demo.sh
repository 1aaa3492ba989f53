#!/usr/bin/env bash
# The main job on embedded defaults: a domain with two qcow2 disks in a
# temporary folder (the folder-of-XML domain source), a real snapshot
# lifecycle through the xlsnap command, and the data read back with
# qemu-io after every step. Any mismatch stops the demo with an error.
set -euo pipefail
xlsnap=$(cd "$(dirname "$0")/.." && pwd)/bin/xlsnap
work=$(mktemp -d /tmp/xlsnap-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT
dom=$work/domains
mkdir -p "$dom"
x() { echo "\$ xlsnap $*"; "$xlsnap" --connect "file://$dom" --state-dir "$work/state" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
active() { "$xlsnap" --connect "file://$dom" --state-dir "$work/state" domblklist --json vm |
  sed -n "/\"target\": \"$1\"/,/\"source\"/s/.*\"source\": \"\(.*\)\",*/\1/p"; }
write() { qemu-io -f qcow2 -c "write -P $2 $3 1M" "$(active "$1")" >/dev/null; }
# expect DISK PATTERN OFFSET: the disk's active layer reads PATTERN there.
expect() {
  local img out
  img=$(active "$1")
  if ! out=$(qemu-io -r -f qcow2 -c "read -P $2 $3 1M" "$img" 2>&1) || grep -q 'verification failed' <<<"$out"; then
    echo "demo: $1 at $3 is not $2 ($img)" >&2
    echo "$out" >&2
    exit 1
  fi
  echo "   $1 @ $3 reads $2 ✓"
}
chains() { for d in xvda xvdb; do x chain "$(active $d)" | grep -E '^[0-9]' | sed "s|$work/||; s|^|   $d |"; done; }

step "a shut-off domain with two qcow2 disks"
for d in a b; do qemu-img create -q -f qcow2 "$dom/vm-$d.qcow2" 64M; done
cat > "$dom/vm.xml" <<EOF
<domain type='xen'>
  <name>vm</name>
  <uuid>6b1e7a3e-0e5c-4a8a-9a38-1c0d6d8e2f10</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type>linux</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$dom/vm-a.qcow2'/>
      <target dev='xvda' bus='xen'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$dom/vm-b.qcow2'/>
      <target dev='xvdb' bus='xen'/>
    </disk>
  </devices>
</domain>
EOF
x domblklist vm
write xvda 0x11 0; write xvdb 0x21 0
expect xvda 0x11 0; expect xvdb 0x21 0

step "internal snapshot 'install' (qcow2 internal, both disks)"
x snapshot-create-as vm install --description "fresh install"
write xvda 0x12 0; write xvdb 0x22 0

step "external disk-only snapshot 'upgrade' (new overlays, disks switched)"
x snapshot-create-as vm upgrade --disk-only
x domblklist vm
write xvda 0x13 0; write xvdb 0x23 1M

step "external snapshot 'tuned' of xvda only"
x snapshot-create-as vm tuned --diskspec xvda,snapshot=external --diskspec xvdb,snapshot=no
write xvda 0x14 0
x snapshot-list vm --tree
chains

step "revert to 'upgrade' and branch: 'hotfix'"
x snapshot-revert vm upgrade
expect xvda 0x12 0; expect xvdb 0x22 0; expect xvdb 0x00 1M
write xvda 0x15 0
x snapshot-create-as vm hotfix --disk-only
x snapshot-list vm --tree
x snapshot-info vm hotfix

step "delete 'upgrade', a non-leaf external snapshot: its images are merged"
x snapshot-delete vm upgrade
x snapshot-list vm --parent
chains
expect xvda 0x15 0

step "every remaining snapshot still shows exactly its own data"
x snapshot-revert vm tuned
# xvdb took no part in 'tuned' (snapshot=no): a revert leaves it as it is.
expect xvda 0x13 0; expect xvdb 0x22 0; expect xvdb 0x00 1M
x snapshot-revert vm hotfix
expect xvda 0x15 0; expect xvdb 0x22 0; expect xvdb 0x00 1M
x snapshot-revert vm install
expect xvda 0x11 0; expect xvdb 0x21 0

step "delete the children of 'install' (external, merged), then check metadata against the disks"
x snapshot-delete vm install --children-only
x snapshot-list vm --tree
chains
x check
for img in "$dom"/*; do case $img in *.xml) ;; *) qemu-img check -q -f qcow2 "$img";; esac; done
echo "   qemu-img check: every image clean ✓"

step "live: the same domain running on a QEMU device model (QMP at domains/vm.qmp)"
qemu_args=(-machine q35,accel=tcg -nodefaults -display none -S -qmp "unix:$dom/vm.qmp,server=on,wait=off")
for d in xvda xvdb; do
  img=$(active $d)
  qemu_args+=(-blockdev "driver=file,filename=$img,node-name=f-$d" -blockdev "driver=qcow2,file=f-$d,node-name=$d"
    -device "virtio-blk-pci,drive=$d,share-rw=on")
done
qemu-system-x86_64 "${qemu_args[@]}" >"$work/qemu.log" 2>&1 &
qemu_pid=$!
trap 'kill $qemu_pid 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 100); do [ -S "$dom/vm.qmp" ] && break; sleep 0.1; done
x snapshot-create-as vm live1 --disk-only --description "taken while the device model runs"
x snapshot-info vm live1 | grep -E 'State|Location'
x domblklist vm
x snapshot-delete vm live1
echo "   (the merge ran as a block job inside the device model)"
x domblklist vm
x check
kill $qemu_pid; wait $qemu_pid 2>/dev/null || true
expect xvda 0x11 0; expect xvdb 0x21 0

step "a linked clone shares vm's base: xlsnap finds it and keeps the base"
x snapshot-create-as vm golden --disk-only --diskspec xvda,snapshot=external --diskspec xvdb,snapshot=no
# web2 is a clone of xvda as 'golden' left it: an overlay no record of vm holds.
base=$(qemu-img info --output=json -f qcow2 "$(active xvda)" | sed -n 's/.*"full-backing-filename": "\(.*\)".*/\1/p')
qemu-img create -q -f qcow2 -F qcow2 -b "$base" "$dom/web2.qcow2"
cat > "$dom/web2.xml" <<EOF
<domain type='xen'>
  <name>web2</name>
  <uuid>0b5f5a3c-8c1e-4a4e-8d2a-6f7d1c2b3a40</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type>linux</type></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='$dom/web2.qcow2'/>
      <target dev='xvda' bus='xen'/>
    </disk>
  </devices>
</domain>
EOF
write xvda 0x1f 0
x snapshot-delete vm golden
[ -f "$base" ] || { echo "demo: the clone's base $base was removed" >&2; exit 1; }
if ! out=$(qemu-io -r -f qcow2 -c "read -P 0x11 0 1M" "$dom/web2.qcow2" 2>&1) || grep -q 'verification failed' <<<"$out"; then
  echo "demo: the clone no longer reads the golden data" >&2; echo "$out" >&2; exit 1
fi
echo "   web2 (the clone) @ 0 reads 0x11: its base was kept ✓"
expect xvda 0x1f 0
x check

step "a backing reference that leaves the pool is refused"
mkdir "$work/elsewhere"
qemu-img create -q -f qcow2 "$work/elsewhere/secret.qcow2" 64M
qemu-img create -q -f qcow2 -F qcow2 -b ../elsewhere/secret.qcow2 "$dom/escape.qcow2"
if x chain "$dom/escape.qcow2"; then echo "demo: expected a refusal" >&2; exit 1; fi
echo
echo "demo: done"

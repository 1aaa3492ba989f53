#!/usr/bin/env bash
# Installs only what is missing: Debian packages through apt, Go tools
# through the module proxy. Safe to run again and again.
#   deps.sh [STATICCHECK_VERSION] [xen]   xen: also the Xen test bed's tools
set -euo pipefail
staticcheck_version=${1:-v0.8.2}

# command → Debian package that provides it
declare -A need=(
  [qemu-img]=qemu-utils
  [qemu-io]=qemu-utils
  [qemu-system-x86_64]=qemu-system-x86
  [libvirtd]=libvirt-daemon
  [virsh]=libvirt-clients   # the oracle of the virsh comparison tests
  [xmllint]=libxml2-utils   # libxml2's RelaxNG validator (VALIDATE)
  [etcd]=etcd-server        # the cluster tests' and demo-cluster's members
  [etcdctl]=etcd-client     # demo-cluster reads the journal with it
)
# pkg-config module → Debian package (cgo builds against these)
declare -A needpc=(
  [libvirt]=libvirt-dev
  [xenlight]=libxen-dev
)
# files → Debian package (plugins no command or pkg-config names)
declare -A needfile=(
  [/usr/lib/python3/dist-packages/libvirt.py]=python3-libvirt   # the libvirt-protocol front's second client
  [/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so]=libvirt-daemon-driver-qemu
)
# The Xen test bed (make test-xen) builds its dom0 image with these.
if [ "${2:-}" = xen ]; then
  need+=([debootstrap]=debootstrap [mkfs.ext4]=e2fsprogs [xz]=xz-utils [zstd]=zstd [timeout]=coreutils)
fi
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${need[$cmd]}")
done
for f in "${!needfile[@]}"; do
  [ -e "$f" ] || missing+=("${needfile[$f]}")
done
if ! command -v pkg-config >/dev/null 2>&1; then
  missing+=(pkg-config "${needpc[@]}")
else
  for pc in "${!needpc[@]}"; do
    pkg-config --exists "$pc" || missing+=("${needpc[$pc]}")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "deps: installing ${missing[*]}"
  $sudo apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
fi

gobin=$(go env GOPATH)/bin
if [ ! -x "$gobin/staticcheck" ]; then
  echo "deps: installing staticcheck $staticcheck_version"
  go install "honnef.co/go/tools/cmd/staticcheck@$staticcheck_version"
fi

#!/bin/bash
# Builds (or finds cached) the Xen dom0 image of xlsnap's Xen test bed and
# prints its folder. Everything comes from Debian packages through the
# host's own apt sources (debootstrap + apt-get); nothing else is fetched.
# The cache lives outside the checkout, keyed on the inputs: the package
# list, the in-image scripts and this script.
#   XEN_CACHE  cache root (default /var/cache/xlsnap-xen)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache_root=${XEN_CACHE:-/var/cache/xlsnap-xen}
key=$(cat "$here/build-image.sh" "$here/image/packages.txt" "$here/image/init.sh" "$here/image/guest-init.sh" | sha256sum | cut -c1-16)
out=$cache_root/$key
log() { echo "xen-image: $*" >&2; }
if [ -f "$out/done" ]; then
	log "cached: $out"
	echo "$out"
	exit 0
fi
[ "$(id -u)" = 0 ] || { log "needs root (debootstrap, chroot)"; exit 1; }
for tool in debootstrap mkfs.ext4 qemu-img; do
	command -v "$tool" >/dev/null || { log "missing $tool (apt-get install debootstrap e2fsprogs qemu-utils)"; exit 1; }
done
# The host's Debian mirror, from its apt sources (deb822 or one-line).
mirror=$(grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1 || true)
[ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | grep -v security | head -1 || true)
[ -n "$mirror" ] || { log "no Debian mirror in the host's apt sources"; exit 1; }

start=$(date +%s)
mkdir -p "$cache_root"
work=$(mktemp -d "$cache_root/build.XXXXXX")
root=$work/root
cleanup() {
	for m in dev/pts dev sys proc; do umount -l "$root/$m" 2>/dev/null || true; done
	rm -rf "$work"
}
trap cleanup EXIT

log "debootstrap from $mirror"
debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 ||
	{ tail -30 "$work/debootstrap.log" >&2; exit 1; }
log "debootstrap done after $(($(date +%s) - start)) s"

# The host's apt sources (Debian ones only: the others need keys the
# image does not have).
rm -f "$root/etc/apt/sources.list"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
	[ -f "$f" ] && grep -q 'debian' "$f" && grep -qv 'nodesource\|google' <<<"$f" && cp "$f" "$root/etc/apt/${f#/etc/apt/}"
done
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --bind /dev "$root/dev"
mount --bind /dev/pts "$root/dev/pts"

# A small initramfs: only what dom0 needs to mount its virtio root.
mkdir -p "$root/etc/initramfs-tools/conf.d"
echo MODULES=list >"$root/etc/initramfs-tools/conf.d/xlsnap"
printf '%s\n' virtio_pci virtio_blk ext4 crc32c_generic 9pnet_virtio 9p >>"$root/etc/initramfs-tools/modules"

log "apt-get install"
chroot "$root" /bin/sh -c "apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $(tr '\n' ' ' <"$here/image/packages.txt")" \
	>"$work/apt.log" 2>&1 || { tail -40 "$work/apt.log" >&2; exit 1; }
log "packages done after $(($(date +%s) - start)) s"

# libvirt's libxl driver will not start unless it can name the host CPU
# by one of its models, and every model lists VME, which Xen's host
# featureset lacks under TCG: the image's 486 model does without it.
sed -i "/<feature name='vme'\/>/d" "$root/usr/share/libvirt/cpu_map/x86_486.xml"
# libvirtd stops if any driver fails: the QEMU driver (a dependency of
# libvirt-daemon) wants the libvirt-qemu user of libvirt-daemon-system,
# which the image leaves out. dom0 needs only the libxl driver.
rm -f "$root"/usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so

kver=$(basename "$(ls -d "$root"/lib/modules/* | head -1)")
mkdir -p "$work/out"
chroot "$root" mkinitramfs -o /boot/initrd-small.img "$kver" >"$work/initramfs.log" 2>&1 ||
	{ tail -20 "$work/initramfs.log" >&2; exit 1; }

# The PV guest's initrd: busybox, blkfront, guest-init.sh.
g=$root/tmp/guest
mkdir -p "$g"/{bin,dev,proc,sys,tmp}
cp "$root/bin/busybox" "$g/bin/busybox"
ko=$(find "$root/lib/modules/$kver" -name 'xen-blkfront.ko*' | head -1)
case "$ko" in
*.xz) xz -dc "$ko" >"$g/xen-blkfront.ko" ;;
*.zst) zstd -qdc "$ko" >"$g/xen-blkfront.ko" ;;
*) cp "$ko" "$g/xen-blkfront.ko" ;;
esac
cp "$here/image/guest-init.sh" "$g/init"
chmod +x "$g/init"
chroot "$root" /bin/sh -c 'cd /tmp/guest && find . | cpio -o -H newc --quiet | gzip -1' >"$work/out/guest-initrd.img"
rm -rf "$g"

install -m 0755 "$here/image/init.sh" "$root/xlsnap-init.sh"
mkdir -p "$root/var/log/xen/console" "$root/mnt/share"
echo dom0 >"$root/etc/hostname"
rm -f "$root/usr/sbin/policy-rc.d"
chroot "$root" apt-get clean
cp "$root/boot/vmlinuz-$kver" "$work/out/vmlinuz"
cp "$root/boot/initrd-small.img" "$work/out/initrd-small.img"
cp "$work/out/vmlinuz" "$work/out/guest-initrd.img" "$root/"
xen=$(ls "$root"/boot/xen-4.17*-amd64.gz 2>/dev/null | head -1)
[ -n "$xen" ] || xen=$(ls "$root"/boot/xen-*.gz | head -1)
zcat "$xen" >"$work/out/xen"
for m in dev/pts dev sys proc; do umount -l "$root/$m"; done
truncate -s 3G "$work/out/dom0.img"
mkfs.ext4 -q -F -L dom0 -d "$root" "$work/out/dom0.img"
echo "$kver" >"$work/out/kernel-version"
rm -rf "$out"
mv "$work/out" "$out"
touch "$out/done"
log "built $out in $(($(date +%s) - start)) s"
echo "$out"

#!/bin/sh
# dom0's init (PID 1) for xlsnap's Xen test bed: bring up just enough of
# Debian to run Xen's toolstack, run the test the host put on the 9p
# share, write its exit code back, power off. QEMU exits with the machine.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The initramfs has moved /sys, /dev and /proc here already.
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mountpoint -q /dev/pts || mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mount -o remount,rw /
mkdir -p /run/lock /run/xen /var/log/xen/console
hostname dom0
echo "xlsnap-init: up $(cut -d' ' -f1 /proc/uptime)s"
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback 9pnet_virtio 9p; do
	modprobe "$m" 2>/dev/null
done
grep -q xenfs /proc/filesystems && mount -t xenfs xenfs /proc/xen 2>/dev/null
mkdir -p /mnt/share
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 hostshare /mnt/share || {
	echo "xlsnap-init: FAILED to mount the 9p share"; echo o >/proc/sysrq-trigger; sleep 60; }
# Guest consoles to /var/log/xen/console/guest-NAME.log for failures.
echo XENCONSOLED_TRACE=guest >>/etc/default/xen
/etc/init.d/xen start >/mnt/share/xen-start.log 2>&1
echo "xlsnap-init: xen started rc=$? at $(cut -d' ' -f1 /proc/uptime)s"
rc=127
if [ -x /mnt/share/run.sh ]; then
	/mnt/share/run.sh
	rc=$?
fi
echo "$rc" >/mnt/share/exit-code
echo "xlsnap-init: test exit code $rc at $(cut -d' ' -f1 /proc/uptime)s"
sync
umount /mnt/share 2>/dev/null
echo 1 >/proc/sys/kernel/sysrq
poweroff -f
echo o >/proc/sysrq-trigger
sleep 60

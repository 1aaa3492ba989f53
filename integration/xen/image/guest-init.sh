#!/bin/busybox sh
# The PV test guest's init: load blkfront, then append one 512-byte record
# per second to every disk: sector N holds "xlsnap <disk> seq=N", sector 0
# the last N. The host side reads the records back from the images.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
insmod /xen-blkfront.ko
i=0
while [ ! -b /dev/xvda ] && [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done
disks=$(cd /dev && ls -d xvd? 2>/dev/null)
echo "guest: disks $disks"
seq=1
while :; do
	for d in $disks; do
		printf 'xlsnap %s seq=%d\n' "$d" "$seq" >/tmp/rec
		dd if=/tmp/rec of=/dev/$d bs=512 seek=$seq count=1 conv=sync,fsync 2>/dev/null
		dd if=/tmp/rec of=/dev/$d bs=512 seek=0 count=1 conv=sync,fsync 2>/dev/null
	done
	[ $((seq % 10)) -eq 0 ] && echo "guest: seq=$seq"
	seq=$((seq+1))
	sleep 1
done

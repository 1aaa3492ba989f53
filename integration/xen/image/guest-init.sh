#!/bin/busybox sh
# The PV test guest's init: load blkfront, then append one 512-byte record
# per second to every disk: sector N holds "xlsnap <disk> seq=N", sector 0
# the last N. The host side reads the records back from the images. From
# its second round on it checks each disk's last record against its own
# count and prints "guest: xvdN disk at D, memory at M" where they differ,
# also into sector 4000 of the disk.
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
first=1
while :; do
	# Each disk's last record must be the one this loop wrote last: after a
	# revert to a memory snapshot, a disk ahead of the memory (or behind
	# it) is reported. The cached sector 0 is the memory's view: drop it.
	if [ $first -eq 0 ]; then
		echo 1 >/proc/sys/vm/drop_caches
		for d in $disks; do
			last=$(dd if=/dev/$d bs=512 count=1 2>/dev/null | sed -n 's/^xlsnap [a-z]* seq=\([0-9]*\)$/\1/p')
			if [ "$last" != "$((seq-1))" ]; then
				# On the console and in sector 4000, for guests whose
				# console is not logged.
				echo "guest: $d disk at ${last:-none}, memory at $((seq-1))" | tee /tmp/bad
				dd if=/tmp/bad of=/dev/$d bs=512 seek=4000 count=1 conv=sync,fsync 2>/dev/null
			fi
		done
	fi
	first=0
	for d in $disks; do
		printf 'xlsnap %s seq=%d\n' "$d" "$seq" >/tmp/rec
		dd if=/tmp/rec of=/dev/$d bs=512 seek=$seq count=1 conv=sync,fsync 2>/dev/null
		dd if=/tmp/rec of=/dev/$d bs=512 seek=0 count=1 conv=sync,fsync 2>/dev/null
	done
	[ $((seq % 10)) -eq 0 ] && echo "guest: seq=$seq"
	seq=$((seq+1))
	sleep 1
done

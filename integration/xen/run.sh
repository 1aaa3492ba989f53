#!/bin/bash
# xlsnap's Xen test bed (make test-xen): builds or reuses the dom0 image
# (build-image.sh), builds the in-dom0 test binary on this host against
# libxen-dev 4.17, boots Xen 4.17 + dom0 under QEMU TCG from a throw-away
# overlay, runs the tests there, and reads the results back through a 9p
# share. Fails with the serial log's tail on any timeout.
#   XEN_TIMEOUT  seconds for the whole QEMU run (default 2400)
#   XEN_RUN      -test.run pattern (default: all)
#   XEN_KEEP=1   keep the run folder
#   XEN_CPU      QEMU -cpu (default max,-smap,-smep,-xsave: see README.md)
#   XEN_SCRIPT   a shell script to run in dom0 instead of the tests
#   XEN_TCG_THREAD  TCG threading, multi or single
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
timeout_s=${XEN_TIMEOUT:-2400}
GO=${GO:-go}
t_start=$(date +%s.%N)
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

for tool in qemu-system-x86_64 qemu-img timeout; do
	command -v "$tool" >/dev/null || { echo "test-xen: missing $tool" >&2; exit 1; }
done
t0=$(date +%s.%N)
img=$("$here/build-image.sh")
echo "test-xen: dom0 image $img ($(since "$t0") s)"

run=$(mktemp -d /tmp/xlsnap-xen.XXXXXX)
[ "${XEN_KEEP:-}" = 1 ] || trap 'rm -rf "$run"' EXIT
share=$run/share
mkdir -p "$share"
t0=$(date +%s.%N)
(cd "$repo" && CGO_ENABLED=1 "$GO" test -c -tags 'xen libxl' -o "$share/xen.test" ./integration/xen/)
echo "test-xen: test binary built ($(since "$t0") s)"
cat >"$share/run.sh" <<RUN
#!/bin/sh
cd /tmp
export XLSNAP_XEN_OUT=/mnt/share TMPDIR=/tmp
{ /mnt/share/xen.test -test.v -test.count=1 -test.timeout $((timeout_s - 60))s ${XEN_RUN:+-test.run '$XEN_RUN'}; echo \$? >/mnt/share/test-rc; } 2>&1 | tee /mnt/share/test.log
exit \$(cat /mnt/share/test-rc)
RUN
[ -n "${XEN_SCRIPT:-}" ] && cp "$XEN_SCRIPT" "$share/run.sh"
chmod +x "$share/run.sh"

qemu-img create -q -f qcow2 -F raw -b "$img/dom0.img" "$run/run.qcow2"
echo "test-xen: booting Xen (timeout ${timeout_s}s, serial log $run/serial.log)"
t0=$(date +%s.%N)
set +e
timeout --foreground -k 10 "$timeout_s" qemu-system-x86_64 -M pc -accel "tcg,thread=${XEN_TCG_THREAD:-multi}" -cpu "${XEN_CPU:-max,-smap,-smep,-xsave}" \
	-smp 2 -m 2048 -display none -no-reboot -nic none -serial "file:$run/serial.log" -monitor none \
	-drive "file=$run/run.qcow2,format=qcow2,if=virtio,cache=unsafe" \
	-virtfs "local,path=$share,mount_tag=hostshare,security_model=none,id=hs" \
	-kernel "$img/xen" \
	-append "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=2 loglvl=all guest_loglvl=all" \
	-initrd "$img/vmlinuz console=hvc0 root=/dev/vda rw init=/xlsnap-init.sh,$img/initrd-small.img" &
qpid=$!
# Follow the serial log while QEMU runs.
tail -n +1 -F --pid=$qpid "$run/serial.log" 2>/dev/null | sed -u 's/^/  serial| /' &
wait $qpid
qrc=$?
set -e
sleep 0.5
boot_s=$(since "$t0")
if [ $qrc -eq 124 ] || [ $qrc -eq 137 ]; then
	echo "test-xen: TIMEOUT after ${timeout_s}s; serial log tail:" >&2
	tail -n 60 "$run/serial.log" >&2
	[ -f "$share/test.log" ] && { echo "test-xen: test log tail:" >&2; tail -n 40 "$share/test.log" >&2; }
	exit 1
fi
if [ $qrc -ne 0 ]; then
	echo "test-xen: QEMU exited with $qrc; serial log tail:" >&2
	tail -n 60 "$run/serial.log" >&2
	exit 1
fi
if [ ! -f "$share/exit-code" ]; then
	echo "test-xen: dom0 powered off without a result; serial log tail:" >&2
	tail -n 60 "$run/serial.log" >&2
	exit 1
fi
rc=$(cat "$share/exit-code")
# Every run's logs outlive the run's temporary folder: a CI failure is
# read afterwards on the same machine.
keep=/var/tmp/xlsnap-xen-logs/$(date -u +%Y%m%dT%H%M%SZ)-rc$rc
mkdir -p "$keep" && cp "$share/test.log" "$run/serial.log" "$keep/" 2>/dev/null || true
ls -1dt /var/tmp/xlsnap-xen-logs/* 2>/dev/null | tail -n +21 | xargs -r rm -rf
echo
echo "test-xen: timings"
echo "  image (build or cache hit) and test binary: see above"
echo "  QEMU run (Xen boot + dom0 + tests + power off): ${boot_s} s"
grep -h 'xlsnap-init:' "$run/serial.log" | sed 's/^/  /' || true
[ -f "$share/timings.txt" ] && sed 's/^/  /' "$share/timings.txt"
grep -E '^(=== RUN|--- |PASS|FAIL|ok)' "$share/test.log" | grep -v '=== RUN' | sed 's/^/  /' || true
echo "test-xen: total $(since "$t_start") s"
if [ "$rc" != 0 ]; then
	echo "test-xen: FAILED (exit $rc); logs kept in $keep" >&2
	# A failed test's own lines, last: the part of a long log that is
	# shown is its end.
	for name in $(sed -n 's/^--- FAIL: \([^ ]*\) .*/\1/p' "$share/test.log"); do
		echo "test-xen: the output of $name:" >&2
		sed -n "/^=== RUN   $name\$/,/^--- FAIL: $name /p" "$share/test.log" | tail -n 60 >&2
	done
	exit 1
fi
echo "test-xen: PASS"

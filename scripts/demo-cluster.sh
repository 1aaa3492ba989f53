#!/usr/bin/env bash
# Several hosts on one shared pool: a real three-member etcd cluster on
# loopback (Debian's etcd-server), two "hosts" (separate processes,
# separate folders of domain definitions and state folders) on one pool
# folder. It shows a host hearing the other's snapshot (xlsnap events), a
# base kept because the other host's linked clone reads it, and a host
# killed in the middle of a merge whose operation the other host finishes
# once its lease expired. The data is read back with qemu-io after each
# step; any mismatch stops the demo with an error.
set -euo pipefail
xlsnap=$(cd "$(dirname "$0")/.." && pwd)/bin/xlsnap
work=$(mktemp -d /tmp/xlsnap-cluster.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "demo-cluster: $*" >&2; exit 1; }

# Loopback ports the kernel picks.
ports=($(python3 -c 'import socket
ss=[socket.socket() for _ in range(6)]
for s in ss: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in ss))'))
step "a three-member etcd cluster on loopback"
initial="m0=http://127.0.0.1:${ports[3]},m1=http://127.0.0.1:${ports[4]},m2=http://127.0.0.1:${ports[5]}"
endpoints=""
for i in 0 1 2; do
  client=127.0.0.1:${ports[$i]} peer=http://127.0.0.1:${ports[$((i+3))]}
  etcd --name m$i --data-dir "$work/etcd/m$i" --listen-client-urls "http://$client" --advertise-client-urls "http://$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" --initial-cluster "$initial" \
    --initial-cluster-state new --initial-cluster-token xlsnap-demo --heartbeat-interval 50 --election-timeout 500 \
    --logger zap --log-outputs "$work/etcd-m$i.log" >/dev/null 2>&1 &
  pids+=($!)
  endpoints+="${endpoints:+,}$client"
  echo "   member m$i: $client"
done
ctl() { ETCDCTL_API=3 etcdctl --endpoints "$endpoints" --dial-timeout 1s --command-timeout 2s "$@"; }
for _ in $(seq 50); do
  ctl endpoint health >/dev/null 2>&1 && break
  sleep 0.2
done
if ! ctl endpoint health >/dev/null 2>&1; then
  cat "$work"/etcd-m*.log | tail -20 >&2
  fail "etcd did not start"
fi

pool=$work/pool
mkdir -p "$pool" "$work/A/domains" "$work/B/domains"
# host NAME ARGS...: xlsnap as host NAME: its folder of definitions and
# state folder, the cluster, a lease of 2 s so the demo need not wait long.
host() {
  local h=$1; shift
  "$xlsnap" --connect "file://$work/$h/domains" --state-dir "$work/$h/state" \
    --metadata-store "etcd://$endpoints/xlsnap-demo" --metadata-host "host$h" --metadata-lease 2 "$@"
}
x() { local h=$1; shift; echo "[host$h] \$ xlsnap $*"; host "$h" "$@"; }
define() { # define HOST NAME IMAGE
  cat > "$work/$1/domains/$2.xml" <<XML
<domain type='xen'><name>$2</name><memory unit='KiB'>262144</memory><os><type>linux</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='$3'/><target dev='xvda' bus='xen'/></disk>
</devices></domain>
XML
}
expect() { # expect IMAGE PATTERN OFFSET LENGTH
  local out
  if ! out=$(qemu-io -r -U -f qcow2 -c "read -P $2 $3 $4" "$1" 2>&1) || grep -q 'verification failed' <<<"$out"; then
    echo "$out" >&2; fail "$1 at $3 does not read $2"
  fi
  echo "   ${1#$work/} @ $3+$4 reads $2 ✓"
}

step "the shared pool: a base; host A's web is a linked clone of it in A's own folder"
qemu-img create -q -f qcow2 "$pool/base.qcow2" 64M
qemu-io -f qcow2 -c "write -P 0x11 0 1M" "$pool/base.qcow2" >/dev/null
qemu-img create -q -f qcow2 -F qcow2 -b "$pool/base.qcow2" "$work/A/domains/web.qcow2"
define A web "$work/A/domains/web.qcow2"
qemu-img create -q -f qcow2 "$pool/app.qcow2" 64M
qemu-io -f qcow2 -c "write -P 0x21 0 4M" "$pool/app.qcow2" >/dev/null
define A app "$pool/app.qcow2"
define B db "$pool/base.qcow2"
x A --pool "$work/A/domains" --pool "$pool" domblklist web

step "host B listens for chain changes from any host"
host B events --loop --timeout 120 >"$work/events.txt" 2>"$work/events.err" &
pids+=($!)
for _ in $(seq 100); do grep -q "waiting for events" "$work/events.err" 2>/dev/null && break; sleep 0.1; done
x A --pool "$work/A/domains" --pool "$pool" snapshot-create-as app s1 --disk-only
for _ in $(seq 100); do grep -q "domain 'app'" "$work/events.txt" && break; sleep 0.1; done
grep "domain 'app'" "$work/events.txt" | grep -q "on host hostA" || fail "host B did not hear host A's snapshot"
sed 's/^/   [hostB events] /' "$work/events.txt"

step "host B deletes a snapshot whose merge would write into the base host A's web reads"
x B --pool "$pool" snapshot-create-as db s1 --disk-only
qemu-io -f qcow2 -c "write -P 0x33 0 64k" "$pool/base.s1" >/dev/null
out=$(host B --pool "$pool" snapshot-delete db s1)
echo "$out" | sed 's/^/   /'
grep -q "web on host hostA" <<<"$out" || fail "the base was not kept for host A's web"
expect "$work/A/domains/web.qcow2" 0x11 0 1M
expect "$pool/base.s1" 0x33 0 64k

step "host A dies (SIGKILL) in the middle of a delete's merge"
qemu-io -f qcow2 -c "write -P 0x22 0 64k" "$pool/app.s1" >/dev/null
echo "[hostA] \$ XLSNAP_CRASH_AT=delete/step0-commit xlsnap snapshot-delete app s1"
# (In a subshell, whose report of the kill goes with its stderr.)
if (XLSNAP_CRASH_AT=delete/step0-commit host A --pool "$work/A/domains" --pool "$pool" snapshot-delete app s1) 2>/dev/null; then
  fail "host A was not killed"
fi
echo "   host A is gone; its intent waits in etcd:"
ctl get --prefix /xlsnap-demo/intents/ --print-value-only |
  python3 -c 'import json,sys; [print("   ", i["op"], "of", i["domain"], "by", i["owner"], "holding", i["holder"]) for i in map(json.loads, sys.stdin)]'

step "host B finishes it once host A's lease expired"
# Until then B's check --repair leaves it alone (its domain is locked);
# after, only the definition step is left, for host A.
start=$SECONDS
for _ in $(seq 60); do
  host B --pool "$pool" check --repair >/dev/null 2>&1 || true
  [ "$(ctl get --prefix /xlsnap-demo/intents/ --print-value-only | grep -v '"committed":true' | grep -c . || true)" = 0 ] && break
  sleep 0.5
done
echo "[hostB] \$ xlsnap check --repair   (done after $((SECONDS - start)) s)"
ctl get --prefix /xlsnap-demo/intents/ --print-value-only |
  python3 -c 'import json,sys; [print("    left for host A:", i["op"], "of", i["domain"], "(definition step)") for i in map(json.loads, sys.stdin)]' 
expect "$pool/app.qcow2" 0x22 0 64k
expect "$pool/app.qcow2" 0x21 64k 4032k

step "host A comes back: its next command rewrites its definition (the step B left to it)"
x A --pool "$work/A/domains" --pool "$pool" domblklist app
grep -q "$pool/app.qcow2" "$work/A/domains/app.xml" || fail "host A's definition does not name app.qcow2"
x A --pool "$work/A/domains" --pool "$pool" check
x B --pool "$pool" check
printf '\n\033[1mdemo-cluster: done, every check passed\033[0m\n'

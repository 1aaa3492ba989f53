package main

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// lifecycleWatcher prints every domain lifecycle event of one connection
// as "NAME EVENT DETAIL" through the stock libvirt-python binding; it
// prints "ready" once registered, so no event is missed by a race.
const lifecycleWatcher = `import sys, libvirt
libvirt.virEventRegisterDefaultImpl()
c = libvirt.open(sys.argv[1])
c.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
    lambda conn, dom, event, detail, opaque: print(dom.name(), event, detail, flush=True), None)
print("ready", flush=True)
while True:
    libvirt.virEventRunDefaultImpl()
`

// watchLifecycle starts lifecycleWatcher on uri and returns its lines.
func watchLifecycle(t *testing.T, uri string) <-chan string {
	t.Helper()
	if _, err := os.Stat("/usr/bin/python3"); err != nil {
		t.Skip("no /usr/bin/python3: no event test")
	}
	if out, err := exec.Command("/usr/bin/python3", "-c", "import libvirt").CombinedOutput(); err != nil {
		t.Skipf("python3-libvirt is not installed: %v: %s", err, out)
	}
	cmd := exec.Command("/usr/bin/python3", "-c", lifecycleWatcher, uri)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	lines := make(chan string, 64)
	go func() {
		defer close(lines)
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			lines <- sc.Text()
		}
	}()
	if l := nextLine(t, lines); l != "ready" {
		t.Fatalf("event watcher on %s: %q", uri, l)
	}
	return lines
}

// deviceModelChain is vda's chain as the running QEMU reads it, top first.
func deviceModelChain(t *testing.T, monitor string) []string {
	t.Helper()
	ctx := context.Background()
	m, err := qmp.Dial(ctx, "unix", monitor)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	chains, err := xenlight.Chains(ctx, m)
	if err != nil || len(chains) != 1 {
		t.Fatalf("query-block: %v %v", chains, err)
	}
	return chains[0].Files
}

func nextLine(t *testing.T, lines <-chan string) string {
	t.Helper()
	select {
	case l, ok := <-lines:
		if !ok {
			t.Fatal("the event watcher ended")
		}
		return l
	case <-time.After(60 * time.Second):
		t.Fatal("no event in 60 s")
	}
	return ""
}

// TestServeRelayQEMU puts `xlsnap serve --upstream` in front of a session
// libvirtd running a QEMU/TCG domain, and drives it with the stock virsh
// only: a live disk-only snapshot through the device model (a second QMP
// monitor the definition gives QEMU), guest writes through the device
// model, the tree, a forced revert of the running domain, a delete, and
// the data read back with qemu-io once the domain is stopped. Lifecycle
// events reach a client of the relay as they reach one of the daemon.
func TestServeRelayQEMU(t *testing.T) {
	for _, bin := range []string{"qemu-system-x86_64", "qemu-img", "qemu-io", "virsh"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed: no QEMU relay test", bin)
		}
	}
	upstream := sessionLibvirtd(t)
	// The daemon's QEMU runs as the daemon's user and creates the
	// overlays itself: the folder is that user's.
	dir, err := os.MkdirTemp("", "xlsnap-relayq-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	img := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "16M")
	serveQemuIO(t, img, "write -P 0x11 0 64k")
	if os.Getuid() == 0 {
		for _, p := range []string{dir, img} {
			if err := os.Lchown(p, relayNobody, relayNobody); err != nil {
				t.Fatal(err)
			}
		}
	}
	monitor := filepath.Join(dir, "live.qmp")
	def := filepath.Join(dir, "live.xml")
	if err := os.WriteFile(def, fmt.Appendf(nil, `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>live</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='vda' bus='virtio'/></disk>
  </devices>
  <qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:%s,server=on,wait=off'/></qemu:commandline>
</domain>`, img, monitor), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := startRelay(t, "qemu+unix:///session?socket="+upstream, upstream, dir)
	uri := func(sock string) string { return "qemu+unix:///session?socket=" + sock }
	virsh := func(args ...string) string {
		t.Helper()
		out, err := exec.Command("virsh", append([]string{"-c", uri(sock)}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("virsh %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	direct, relayed := watchLifecycle(t, uri(upstream)), watchLifecycle(t, uri(sock))
	// events reads both watchers' events up to each of want in turn: the
	// daemon's client and the relay's must see the very same ones.
	events := func(want ...string) {
		t.Helper()
		for _, w := range want {
			for {
				d, r := nextLine(t, direct), nextLine(t, relayed)
				if d != r {
					t.Fatalf("event: daemon's client got %q, relay's %q", d, r)
				}
				if d == w {
					break
				}
			}
		}
	}
	// guestWrite writes through the running device model, as the guest's
	// own writes would go: to whatever image is on top of vda now.
	guestWrite := func(pattern string) {
		t.Helper()
		ctx := context.Background()
		m, err := qmp.Dial(ctx, "unix", monitor)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Disconnect()
		var out string
		cmd := fmt.Sprintf(`qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend "write -P %s 0 64k"`, pattern)
		if err := m.Execute(ctx, "human-monitor-command", map[string]any{"command-line": cmd}, &out); err != nil || strings.Contains(out, "failed") || strings.Contains(out, "rror") {
			t.Fatalf("%s: %v %s", cmd, err, out)
		}
	}
	activeImage := func() string {
		t.Helper()
		for _, line := range strings.Split(virsh("domblklist", "live", "--inactive"), "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == "vda" {
				return f[1]
			}
		}
		t.Fatal("no vda in domblklist")
		return ""
	}

	virsh("define", def)
	events("live 0 0") // defined, added
	virsh("start", "live")
	events("live 4 0", "live 2 0") // resumed (libvirt's start-up), started booted
	if out := virsh("snapshot-create-as", "live", "s1", "--disk-only"); out != "Domain snapshot s1 created\n" {
		t.Fatalf("create s1: %q", out)
	}
	events("live 0 1") // the driver redefined the domain onto the overlay
	s1 := filepath.Join(dir, "base.s1")
	if got := activeImage(); got != s1 {
		t.Fatalf("after s1 the definition's vda is %s, want %s", got, s1)
	}
	// The running QEMU itself writes to the overlay now (libvirt's live
	// XML still names the image it started with).
	if got := deviceModelChain(t, monitor); !slices.Equal(got, []string{s1, img}) {
		t.Fatalf("after s1 the device model's chain is %v, want [%s %s]", got, s1, img)
	}
	guestWrite("0x22")
	virsh("snapshot-create-as", "live", "s2", "--disk-only")
	events("live 0 1")
	guestWrite("0x33")
	if out := virsh("snapshot-list", "live", "--tree"); out != "s1\n  |\n  +- s2\n    \n\n" {
		t.Fatalf("tree: %q", out)
	}
	if out := virsh("domstate", "live"); out != "running\n\n" {
		t.Fatalf("the domain is %q after two live snapshots", out)
	}
	// A disk-only snapshot holds no memory: reverting a running domain
	// to it stops it, so it needs FORCE, refused with the code
	// (VIR_ERR_SNAPSHOT_REVERT_RISKY) after which virsh's --force retries.
	if out, err := exec.Command("virsh", "-c", uri(sock), "snapshot-revert", "live", "s2").CombinedOutput(); err == nil ||
		!strings.Contains(string(out), "error: revert requires force: live is running") {
		t.Fatalf("revert of a running domain without --force: %v\n%s", err, out)
	}
	virsh("snapshot-revert", "live", "s2", "--force")
	events("live 5 1") // stopped, destroyed
	serveQemuIO(t, activeImage(), "read -P 0x22 0 64k")
	virsh("snapshot-revert", "live", "s1")
	serveQemuIO(t, activeImage(), "read -P 0x11 0 64k")
	virsh("snapshot-delete", "live", "s2")
	if out := virsh("snapshot-list", "live", "--name"); out != "s1\n\n" {
		t.Fatalf("after deleting s2: %q", out)
	}
	serveQemuIO(t, activeImage(), "read -P 0x11 0 64k")
	// The reverted definition starts, reading s1's data; a snapshot
	// taken and deleted while it runs merges through a block job on the
	// second monitor, and the domain runs on.
	virsh("start", "live")
	events("live 4 0", "live 2 0")
	before := activeImage()
	virsh("snapshot-create-as", "live", "s3", "--disk-only")
	guestWrite("0x44")
	virsh("snapshot-delete", "live", "s3")
	if out := virsh("domstate", "live"); out != "running\n\n" {
		t.Fatalf("the domain is %q after a live delete", out)
	}
	if got := deviceModelChain(t, monitor); len(got) == 0 || got[0] != activeImage() {
		t.Fatalf("after the live delete the device model reads %v, the definition names %s (before s3: %s)", got, activeImage(), before)
	}
	virsh("destroy", "live")
	events("live 5 1")
	// The write made on s3's overlay outlives its merge.
	serveQemuIO(t, activeImage(), "read -P 0x44 0 64k")
}

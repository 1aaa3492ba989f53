// Package coalesce tests coalescing end to end on a running domain: the
// driver on a folder of domain XML files, a real QEMU device model (TCG,
// headless) serving the domain's disk at NAME.qmp, guest writes through
// that device model, merges as its block jobs, and the data read back
// from the images once QEMU has exited.
package coalesce

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qemu"
	"github.com/xlsnap/xlsnap/xenlight/qemutest"
)

const mib = 1 << 20

type env struct {
	t    *testing.T
	ctx  context.Context
	dir  string
	img  string
	qemu *qemutest.Process
	h    *qemu.Backend
	d    *driver.Driver
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// newEnv makes domain "vm" with disk xvda on vm-xvda.qcow2 and starts its
// device model.
func newEnv(t *testing.T) *env {
	t.Helper()
	sock := qemutest.SocketPath(t, "vm.qmp")
	dir := filepath.Dir(sock) // short: the socket's path must be
	e := &env{t: t, ctx: context.Background(), dir: dir, img: filepath.Join(dir, "vm-xvda.qcow2")}
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", e.img, "16M")
	def := fmt.Sprintf(`<domain type='xen'><name>vm</name><memory>262144</memory><os><type>linux</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda'/></disk>
</devices></domain>`, e.img)
	if err := os.WriteFile(filepath.Join(dir, "vm.xml"), []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	e.qemu = qemutest.Start(t, sock, []qemutest.Disk{{NodeName: "xvda", Path: e.img, Format: "qcow2"}})
	src, err := driver.NewDirSource(dir)
	if err != nil {
		t.Fatal(err)
	}
	e.h = qemu.New(func(domain string) string { return filepath.Join(dir, domain+".qmp") })
	if e.d, err = driver.Open(e.ctx, driver.Config{StateDir: t.TempDir(), Source: src, Hypervisor: e.h}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.d.Close() })
	return e
}

func (e *env) path(name string) string { return filepath.Join(e.dir, name) }

// chain is xvda's recorded chain, as the driver lists it.
func (e *env) chain() []string {
	e.t.Helper()
	disks, err := e.d.DiskList(e.ctx, "vm")
	if err != nil || len(disks) != 1 {
		e.t.Fatalf("DiskList: %+v %v", disks, err)
	}
	return disks[0].Chain
}

// deviceChain is the chain the device model reads, with its node.
func (e *env) deviceChain() xenlight.DiskChain {
	e.t.Helper()
	m, err := e.h.DeviceModel(e.ctx, "vm")
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Disconnect()
	c, err := xenlight.Chains(e.ctx, m)
	if err != nil || len(c) != 1 {
		e.t.Fatalf("query-block: %+v %v", c, err)
	}
	return c[0]
}

// expectChain asserts the records, the definition and the device model
// all have xvda on exactly these images, top first.
func (e *env) expectChain(want ...string) {
	e.t.Helper()
	for i := range want {
		want[i] = e.path(want[i])
	}
	if got := e.chain(); !slices.Equal(got, want) {
		e.t.Fatalf("recorded chain %v, want %v", got, want)
	}
	if got := e.deviceChain().Files; !slices.Equal(got, want) {
		e.t.Fatalf("the device model reads %v, want %v\n%s", got, want, e.qemu.Stderr())
	}
	def, err := os.ReadFile(e.path("vm.xml"))
	if err != nil {
		e.t.Fatal(err)
	}
	if !strings.Contains(string(def), "file=\""+want[0]+"\"") && !strings.Contains(string(def), "file='"+want[0]+"'") {
		e.t.Fatalf("the definition does not name %s:\n%s", want[0], def)
	}
}

// write writes pattern over the MiB at off, as the guest would.
func (e *env) write(pattern byte, off int) {
	e.t.Helper()
	node := e.deviceChain().Node // QMP serves one connection at a time
	m, err := e.h.DeviceModel(e.ctx, "vm")
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Disconnect()
	if err := qemutest.GuestWrite(e.ctx, m, node, pattern, off, mib); err != nil {
		e.t.Fatal(err)
	}
}

// stop quits the device model and waits for QEMU to exit: its images are
// closed and unlocked.
func (e *env) stop() {
	e.t.Helper()
	m, err := e.h.DeviceModel(e.ctx, "vm")
	if err != nil {
		e.t.Fatal(err)
	}
	if err := m.Execute(e.ctx, "quit", nil, nil); err != nil {
		e.t.Fatal(err)
	}
	m.Disconnect()
	// qemutest's own goroutine reaps QEMU; WNOWAIT waits for the exit
	// without taking the status from it (ECHILD: it was faster).
	var info unix.Siginfo
	if err := unix.Waitid(unix.P_PID, e.qemu.Cmd.Process.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil); err != nil && !errors.Is(err, syscall.ECHILD) {
		e.t.Fatal(err)
	}
}

// expectData reads the image back with the write lock (QEMU is gone).
func expectData(t *testing.T, img string, patterns map[int]byte) {
	t.Helper()
	var args []string
	for off, p := range patterns {
		args = append(args, "-c", fmt.Sprintf("read -P 0x%02x %d %d", p, off, mib))
	}
	out := sh(t, "qemu-io", append(append([]string{"-f", "qcow2"}, args...), img)...)
	if strings.Contains(out, "verification failed") {
		t.Fatalf("%s: %s", img, out)
	}
	sh(t, "qemu-img", "check", "-q", "-f", "qcow2", img)
}

// TestLiveCoalesce: a NO_METADATA snapshot of the running domain leaves
// the user's image under an overlay nothing needs; check lists it, a dry
// run changes nothing, and Coalesce commits the overlay down inside the
// device model (an active commit): the guest goes on writing the user's
// image, and once QEMU exits every write is there.
func TestLiveCoalesce(t *testing.T) {
	e := newEnv(t)
	e.write(0x11, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>nm</name></domainsnapshot>",
		driver.CreateDiskOnly|driver.CreateNoMetadata); err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	e.expectChain("vm-xvda.nm", "vm-xvda.qcow2")
	e.write(0x12, mib)
	problems, err := e.d.Check(e.ctx, false)
	if err != nil || len(problems) != 1 || problems[0].Kind != driver.ProblemCoalescible {
		t.Fatalf("check: %+v %v, want xvda coalescible", problems, err)
	}
	dry, err := e.d.Coalesce(e.ctx, "vm", driver.CoalesceDryRun)
	if err != nil || len(dry.Merges) != 1 {
		t.Fatalf("dry run: %+v %v", dry, err)
	}
	e.expectChain("vm-xvda.nm", "vm-xvda.qcow2")
	rep, err := e.d.Coalesce(e.ctx, "", 0)
	if err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if len(rep.Merges) != 1 || rep.Merges[0].Action != driver.ActionMergedDown || rep.Merges[0].Layer != e.img || rep.Merges[0].Removed != e.path("vm-xvda.nm") {
		t.Fatalf("coalesce: %+v", rep.Merges)
	}
	e.expectChain("vm-xvda.qcow2")
	e.write(0x13, 2*mib)
	if problems, err := e.d.Check(e.ctx, false); err != nil || len(problems) != 0 {
		t.Fatalf("check: %+v %v", problems, err)
	}
	e.stop()
	expectData(t, e.img, map[int]byte{0: 0x11, mib: 0x12, 2 * mib: 0x13})
	if _, err := os.Stat(e.path("vm-xvda.nm")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the merged overlay is still there: %v", err)
	}
}

// TestLiveDeleteFreesLayer: on the running domain, an external snapshot
// whose overlay holds an internal snapshot cannot merge; deleting the
// internal snapshot (inside the device model) frees the user's image
// under it, and the same delete merges it, live.
func TestLiveDeleteFreesLayer(t *testing.T) {
	e := newEnv(t)
	e.write(0x21, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	e.write(0x22, mib)
	if _, err := e.d.CreateSnapshot(e.ctx, "vm", driver.SnapshotRequest{Name: "i1", Disks: []driver.DiskRequest{{Name: "xvda"}}}, 0); err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	e.write(0x23, 2*mib)
	rep, err := e.d.SnapshotDelete(e.ctx, "vm", "s1", 0)
	if err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if len(rep.Disks) != 1 || rep.Disks[0].Action != driver.ActionInternalAbove || len(rep.Coalesced) != 0 {
		t.Fatalf("delete s1: %+v", rep)
	}
	e.expectChain("vm-xvda.s1", "vm-xvda.qcow2")
	e.write(0x24, 3*mib)
	if rep, err = e.d.SnapshotDelete(e.ctx, "vm", "i1", 0); err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if len(rep.Coalesced) != 1 || rep.Coalesced[0].Layer != e.img || rep.Coalesced[0].Action != driver.ActionMergedDown {
		t.Fatalf("delete i1 merged %+v, want vm-xvda.qcow2 with its child, committed down live", rep.Coalesced)
	}
	e.expectChain("vm-xvda.qcow2")
	e.write(0x25, 4*mib)
	if problems, err := e.d.Check(e.ctx, false); err != nil || len(problems) != 0 {
		t.Fatalf("check: %+v %v", problems, err)
	}
	e.stop()
	expectData(t, e.img, map[int]byte{0: 0x21, mib: 0x22, 2 * mib: 0x23, 3 * mib: 0x24, 4 * mib: 0x25})
	if out := sh(t, "qemu-img", "snapshot", "-l", e.img); strings.Contains(out, "i1") {
		t.Fatalf("i1 is still in the image: %s", out)
	}
}

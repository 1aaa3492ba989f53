// Package live tests xlsnap's live paths end to end: the driver on a
// folder of domain XML files, a real QEMU device model (TCG, headless)
// serving the domain's disks at NAME.qmp, guest I/O through that device
// model, and data read back after every snapshot, revert and delete.
package live

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/storagetest"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qemu"
	"github.com/xlsnap/xlsnap/xenlight/qemutest"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

const mib = 1 << 20

type env struct {
	t    *testing.T
	ctx  context.Context
	dir  string
	qemu *qemutest.Process
	d    *driver.Driver
	h    *qemu.Backend
}

func sh(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// newEnv makes domain "vm" with disks xvda and xvdb and starts its device
// model (paused, as a domain between pause and resume).
func newEnv(t *testing.T) *env {
	t.Helper()
	sock := qemutest.SocketPath(t, "vm.qmp")
	// The folder holds the definitions and the socket; the socket path
	// must stay short, so the images live in the same short folder.
	dir := filepath.Dir(sock)
	e := &env{t: t, ctx: context.Background(), dir: dir}
	var disks []qemutest.Disk
	for _, disk := range []string{"xvda", "xvdb"} {
		p := filepath.Join(dir, "vm-"+disk+".qcow2")
		sh(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
		disks = append(disks, qemutest.Disk{NodeName: disk, Path: p, Format: "qcow2"})
	}
	def := fmt.Sprintf(`<domain type='xen'><name>vm</name><memory>262144</memory><os><type>linux</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda'/></disk>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvdb'/></disk>
</devices></domain>`, disks[0].Path, disks[1].Path)
	if err := os.WriteFile(filepath.Join(dir, "vm.xml"), []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	e.qemu = qemutest.Start(t, sock, disks)
	src, err := driver.NewDirSource(dir)
	if err != nil {
		t.Fatal(err)
	}
	e.h = qemu.New(func(domain string) string { return filepath.Join(dir, domain+".qmp") })
	e.d, err = driver.Open(e.ctx, driver.Config{StateDir: t.TempDir(), Source: src, Hypervisor: e.h})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.d.Close() })
	return e
}

func (e *env) path(name string) string { return filepath.Join(e.dir, name) }

// files names what the folder holds.
func (e *env) files() []string {
	e.t.Helper()
	return storagetest.Files(e.t, e.dir)
}

// node is the device model's top node of a disk (by its recorded image).
func (e *env) chains() []xenlight.DiskChain {
	e.t.Helper()
	m, err := e.h.DeviceModel(e.ctx, "vm")
	if err != nil {
		e.t.Fatal(err)
	}
	defer m.Disconnect()
	c, err := xenlight.Chains(e.ctx, m)
	if err != nil {
		e.t.Fatal(err)
	}
	return c
}

func (e *env) disk(target string) driver.DiskInfo {
	e.t.Helper()
	disks, err := e.d.DiskList(e.ctx, "vm")
	if err != nil {
		e.t.Fatal(err)
	}
	for _, d := range disks {
		if d.Target == target {
			return d
		}
	}
	e.t.Fatalf("no disk %s", target)
	return driver.DiskInfo{}
}

// write writes a MiB of pattern on the disk inside the device model, as
// the guest's own I/O would (writeLen).
func (e *env) write(target string, pattern byte, off int) {
	e.t.Helper()
	e.writeLen(target, pattern, off, mib)
}

// expect reads the disk's recorded chain from disk, the device model
// still running (qemu-io -U).
func (e *env) expect(target string, pattern byte, off int) {
	e.t.Helper()
	storagetest.ExpectImage(e.t, e.disk(target).Source, "qcow2", pattern, off, mib)
}

// expectChains asserts the device model reads exactly the recorded chain
// of every disk.
func (e *env) expectChains() {
	e.t.Helper()
	for _, target := range []string{"xvda", "xvdb"} {
		want := e.disk(target).Chain
		found := false
		for _, c := range e.chains() {
			if slices.Equal(c.Files, want) {
				found = true
			}
		}
		if !found {
			e.t.Fatalf("%s: recorded chain %v, device model has %+v", target, want, e.chains())
		}
	}
}

func TestLiveDiskOnlySnapshotAndMerges(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x11, 0)
	e.write("xvdb", 0x21, 0)
	snap, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly|driver.CreateAtomic)
	if err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if snap.State != "disk-snapshot" {
		t.Fatalf("state %q", snap.State)
	}
	// Both disks switched in one transaction; the definition follows.
	if got := e.disk("xvda").Chain; !slices.Equal(got, []string{e.path("vm-xvda.s1"), e.path("vm-xvda.qcow2")}) {
		t.Fatalf("xvda chain %v", got)
	}
	e.expectChains()
	var def libvirtxml.Domain
	raw, _ := os.ReadFile(e.path("vm.xml"))
	if err := def.Unmarshal(string(raw)); err != nil || def.Devices.Disks[1].Source.File.File != e.path("vm-xvdb.s1") {
		t.Fatalf("vm.xml not repointed: %v\n%s", err, raw)
	}
	e.write("xvda", 0x12, mib)
	e.write("xvdb", 0x22, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s2</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	e.write("xvda", 0x13, 0)

	// Deleting s1 merges vm-x.qcow2 with vm-x.s1 while the domain runs:
	// block jobs inside the device model, never qemu-img behind it.
	report, err := e.d.SnapshotDelete(e.ctx, "vm", "s1", 0)
	if err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if len(report.Disks) != 2 {
		t.Fatalf("report %+v, want both disks", report.Disks)
	}
	for _, r := range report.Disks {
		if r.Action != "merged-down" && r.Action != "pulled-up" {
			t.Fatalf("report %+v", report.Disks)
		}
	}
	e.expectChains()
	if n := len(e.disk("xvda").Chain); n != 2 {
		t.Fatalf("xvda chain after the merge: %v", e.disk("xvda").Chain)
	}
	e.expect("xvda", 0x13, 0)
	e.expect("xvda", 0x12, mib)
	e.expect("xvdb", 0x22, 0)

	// Deleting the leaf s2 merges the active layer: an active commit.
	if report, err = e.d.SnapshotDelete(e.ctx, "vm", "s2", 0); err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	if len(report.Disks) != 2 {
		t.Fatalf("report %+v, want both disks", report.Disks)
	}
	e.expectChains()
	if n := len(e.disk("xvda").Chain); n != 1 {
		t.Fatalf("xvda chain after merging everything: %v", e.disk("xvda").Chain)
	}
	e.expect("xvda", 0x13, 0)
	e.expect("xvda", 0x12, mib)
	e.expect("xvdb", 0x22, 0)
	problems, err := e.d.Storage().Check(e.ctx)
	if err != nil || len(problems) != 0 {
		t.Fatalf("check: %+v %v", problems, err)
	}
}

func TestLiveInternalSnapshot(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x31, 0)
	if _, err := e.d.CreateSnapshot(e.ctx, "vm", driver.SnapshotRequest{Name: "i1", Disks: []driver.DiskRequest{
		{Name: "xvda"}, {Name: "xvdb", Skip: true}}}, 0); err != nil {
		t.Fatalf("%v\n%s", err, e.qemu.Stderr())
	}
	e.write("xvda", 0x32, 0)
	// The internal snapshots of the image the device model writes.
	snapshots := func() []string {
		t.Helper()
		m, err := e.h.DeviceModel(e.ctx, "vm")
		if err != nil {
			t.Fatal(err)
		}
		var blocks []struct {
			Inserted struct {
				Image struct {
					Snapshots []struct {
						Name string `json:"name"`
					} `json:"snapshots"`
				} `json:"image"`
			} `json:"inserted"`
		}
		err = m.Execute(e.ctx, "query-block", nil, &blocks)
		m.Disconnect()
		if err != nil || len(blocks) == 0 {
			t.Fatalf("query-block: %+v %v", blocks, err)
		}
		var names []string
		for _, s := range blocks[0].Inserted.Image.Snapshots {
			names = append(names, s.Name)
		}
		return names
	}
	if got := snapshots(); !slices.Equal(got, []string{"i1"}) {
		t.Fatalf("internal snapshots in the device model: %v, want [i1]", got)
	}
	// Deleted live too.
	if _, err := e.d.SnapshotDelete(e.ctx, "vm", "i1", 0); err != nil {
		t.Fatal(err)
	}
	if got := snapshots(); len(got) != 0 {
		t.Fatalf("internal snapshots in the device model after the delete: %v", got)
	}
	if list, err := e.d.ListAllSnapshots(e.ctx, "vm", 0); err != nil || len(list) != 0 {
		t.Fatalf("snapshots after the delete: %v %v", list, err)
	}
	e.expect("xvda", 0x32, 0)
}

// TestFailedTransactionLeavesNothing: the second disk's overlay cannot be
// created, so the transaction fails inside QEMU; the first disk's overlay
// file, which QEMU had created, is removed, and nothing is recorded.
func TestFailedTransactionLeavesNothing(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x41, 0)
	before := e.files()
	if err := os.Mkdir(e.path("ro"), 0o500); err != nil {
		t.Fatal(err)
	}
	bad := e.path("ro/missing/vm-xvdb.x")
	_, err := e.d.CreateSnapshot(e.ctx, "vm", driver.SnapshotRequest{Name: "x", Disks: []driver.DiskRequest{
		{Name: "xvda", External: true}, {Name: "xvdb", External: true, ExternalPath: bad}}}, driver.CreateDiskOnly)
	var qe *qmp.Error
	if !errors.As(err, &qe) {
		t.Fatalf("failed transaction: %v", err)
	}
	if err := os.Remove(e.path("ro")); err != nil {
		t.Fatal(err)
	}
	if after := e.files(); !slices.Equal(after, before) {
		t.Fatalf("files left behind: %v -> %v", before, after)
	}
	if list, err := e.d.ListAllSnapshots(e.ctx, "vm", 0); err != nil || len(list) != 0 {
		t.Fatalf("snapshot recorded after a failed transaction: %v %v", list, err)
	}
	e.expectChains()
	e.expect("xvda", 0x41, 0)
}

func TestLiveRevertAndMemory(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x51, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	e.write("xvda", 0x52, 0)
	// A bare device model keeps no Xen memory: typed refusal, nothing changed.
	_, err := e.d.SnapshotCreateXML(e.ctx, "vm",
		fmt.Sprintf("<domainsnapshot><name>m</name><memory snapshot='external' file='%s'/></domainsnapshot>", e.path("mem")), 0)
	if !errors.Is(err, errdefs.ErrLiveUnsupported) || driver.Code(err) != driver.ErrNumOperationUnsupported {
		t.Fatalf("memory snapshot on a bare device model: %v", err)
	}
	// Reverting a running domain to a snapshot without memory needs FORCE
	// (REVERT_RISKY, the code after which virsh retries with it).
	if err := e.d.RevertToSnapshot(e.ctx, "vm", "s1", 0); !errors.Is(err, driver.ErrRevertRisky) {
		t.Fatalf("revert without FORCE: %v", err)
	}
	if err := e.d.RevertToSnapshot(e.ctx, "vm", "s1", driver.RevertForce); err != nil {
		t.Fatal(err)
	}
	if st, _ := e.h.State(e.ctx, "vm"); st != xenlight.Shutoff {
		t.Fatalf("state after a forced revert: %s", st)
	}
	storagetest.ExpectImage(t, e.disk("xvda").Source, "qcow2", 0x51, 0, mib)

	// A snapshot with memory (recorded with REDEFINE) cannot be restored
	// by a bare device model: refused before anything changes (FORCE, as
	// the record has no definition to roll back to).
	if err := os.WriteFile(e.path("mem"), []byte("memory image"), 0o600); err != nil {
		t.Fatal(err)
	}
	// m is recorded on the chain the revert left, whose state image is
	// s1's; one image belongs to one snapshot, so s1's record goes first.
	if _, err := e.d.SnapshotDelete(e.ctx, "vm", "s1", driver.DeleteMetadataOnly); err != nil {
		t.Fatal(err)
	}
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", fmt.Sprintf(`<domainsnapshot><name>m</name><state>running</state><creationTime>1700000000</creationTime>
<memory snapshot='external' file='%s'/><disks><disk name='xvda' snapshot='external'><source file='%s'/></disk><disk name='xvdb' snapshot='no'/></disks></domainsnapshot>`,
		e.path("mem"), e.disk("xvda").Source), driver.CreateRedefine); err != nil {
		t.Fatal(err)
	}
	def, err := os.ReadFile(e.path("vm.xml"))
	if err != nil {
		t.Fatal(err)
	}
	files, _ := os.ReadDir(e.dir)
	if err := e.d.RevertToSnapshot(e.ctx, "vm", "m", driver.RevertForce); !errors.Is(err, driver.ErrLiveUnsupported) {
		t.Fatalf("revert to memory on a bare device model: %v", err)
	}
	if now, _ := os.ReadFile(e.path("vm.xml")); string(now) != string(def) {
		t.Fatalf("the refused revert rewrote the definition")
	}
	if now, _ := os.ReadDir(e.dir); len(now) != len(files) {
		t.Fatalf("the refused revert changed the folder: %d -> %d entries", len(files), len(now))
	}
}

// TestRescanReportsTheDifference: a snapshot taken behind xlsnap's back
// (straight through QMP) leaves the device model on a chain xlsnap does
// not know; the rescan hook says exactly how they differ.
func TestRescanReportsTheDifference(t *testing.T) {
	e := newEnv(t)
	if err := e.d.ChainChanged(e.ctx, "vm", "xvda"); err != nil {
		t.Fatalf("rescan of an unchanged chain: %v", err)
	}
	m, err := e.h.DeviceModel(e.ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	err = m.Execute(e.ctx, "blockdev-snapshot-sync", map[string]any{"node-name": "xvda",
		"snapshot-file": e.path("outside.qcow2"), "snapshot-node-name": "outside", "format": "qcow2"}, nil)
	m.Disconnect()
	if err != nil {
		t.Fatal(err)
	}
	err = e.d.ChainChanged(e.ctx, "vm", "xvda")
	var me *xenlight.MismatchError
	if !errors.As(err, &me) || !errors.Is(err, xenlight.ErrChainMismatch) ||
		!slices.Equal(me.DeviceModel, []string{e.path("outside.qcow2"), e.path("vm-xvda.qcow2")}) ||
		!slices.Equal(me.OnDisk, []string{e.path("vm-xvda.qcow2")}) || !strings.Contains(err.Error(), "outside.qcow2") {
		t.Fatalf("rescan after an outside snapshot: %#v", err)
	}
}

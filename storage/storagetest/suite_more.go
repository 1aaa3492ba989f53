package storagetest

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/storage"
)

// testBadInput: each refusal is typed and changes nothing on disk or in
// metadata.
func testBadInput(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0xe1, 0, mib)
	e.snapshot("vm", "s1", external("vda"))
	files := e.PoolFiles()
	chainBefore := e.Chain("vm", "vda")
	cases := []struct {
		name string
		spec storage.SnapshotSpec
		dom  string
		want error
	}{
		{"existing name", storage.SnapshotSpec{Name: "s1", Disks: external("vda")}, "vm", storage.ErrSnapshotExists},
		{"unknown disk", storage.SnapshotSpec{Name: "x", Disks: external("vdz")}, "vm", storage.ErrInvalidArg},
		{"slash in name", storage.SnapshotSpec{Name: "a/b", Disks: external("vda")}, "vm", storage.ErrInvalidArg},
		{"dot-dot name", storage.SnapshotSpec{Name: "..", Disks: external("vda")}, "vm", storage.ErrInvalidArg},
		{"unknown domain", storage.SnapshotSpec{Name: "x", Disks: external("vda")}, "nosuch", storage.ErrNoDomain},
		{"overlay outside the pool", storage.SnapshotSpec{Name: "x", Disks: []storage.SnapshotDiskSpec{
			{Target: "vda", Mode: storage.DiskExternal, Overlay: "/tmp/escape.qcow2"}}}, "vm", storage.ErrInvalidArg},
		{"overlay exists", storage.SnapshotSpec{Name: "x", Disks: []storage.SnapshotDiskSpec{
			{Target: "vda", Mode: storage.DiskExternal, Overlay: e.Path("vm-vda.qcow2")}}}, "vm", storage.ErrInvalidArg},
		{"raw overlay", storage.SnapshotSpec{Name: "x", Disks: []storage.SnapshotDiskSpec{
			{Target: "vda", Mode: storage.DiskExternal, Format: "raw"}}}, "vm", storage.ErrUnsupported},
		{"bad mode", storage.SnapshotSpec{Name: "x", Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: "sideways"}}}, "vm", storage.ErrInvalidArg},
		{"disk twice", storage.SnapshotSpec{Name: "x", Disks: external("vda", "vda")}, "vm", storage.ErrInvalidArg},
	}
	for _, tc := range cases {
		if _, err := e.M.CreateSnapshot(e.Ctx, tc.dom, tc.spec); !errors.Is(err, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, err, tc.want)
		}
	}
	if _, err := e.M.Revert(e.Ctx, "vm", "nosuch", storage.RevertOptions{}); !errors.Is(err, storage.ErrNoSnapshot) {
		t.Errorf("revert of a missing snapshot: %v", err)
	}
	if _, err := e.M.DeleteSnapshot(e.Ctx, "vm", "nosuch", storage.DeleteOptions{}); !errors.Is(err, storage.ErrNoSnapshot) {
		t.Errorf("delete of a missing snapshot: %v", err)
	}
	if _, err := e.M.DeleteSnapshot(e.Ctx, "vm", "s1", storage.DeleteOptions{Children: true, ChildrenOnly: true}); !errors.Is(err, storage.ErrInvalidArg) {
		t.Errorf("children and children-only: %v", err)
	}
	// A disk whose backing file escapes the pool is refused at definition.
	escape := e.Path("escape.qcow2")
	e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", "/etc/hostname", escape, "16M")
	_, err := e.M.DefineDomain(e.Ctx, "evil", "evil", "", []storage.DiskSpec{{Target: "vda", Path: escape, Format: "qcow2"}})
	if !errors.Is(err, storage.ErrUnsafeBacking) {
		t.Errorf("define with an escaping backing file: %v", err)
	}
	os.Remove(escape)
	if !slices.Equal(e.PoolFiles(), files) || !slices.Equal(e.Chain("vm", "vda"), chainBefore) {
		t.Fatalf("refused calls changed the pool: %v -> %v", files, e.PoolFiles())
	}
	e.expectSnapshots("vm", "s1")
	e.CheckClean("vm")
}

func testEvents(t *testing.T, e *Env) {
	events, cancel := e.M.Subscribe()
	defer cancel()
	e.NewDomain("vm", "vda", "vdb")
	e.snapshot("vm", "s1", []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}})
	ev := nextEvent(t, events, "a snapshot")
	if ev.Domain != "vm" || ev.Disk != "vda" || ev.Reason != "snapshot" ||
		!slices.Equal(ev.Before, []string{e.Path("vm-vda.qcow2")}) ||
		!slices.Equal(ev.After, []string{e.Path("vm-vda.s1"), e.Path("vm-vda.qcow2")}) {
		t.Fatalf("event %+v", ev)
	}
	e.revert("vm", "s1")
	ev = nextEvent(t, events, "a revert")
	if ev.Reason != "revert" || ev.Disk != "vda" || ev.After[0] != e.Path("vm-vda.s1-1") {
		t.Fatalf("revert event %+v", ev)
	}
	// Events are handed over by a goroutine per subscriber: a stray one
	// for vdb may still be on its way.
	select {
	case ev := <-events:
		t.Fatalf("unexpected event %+v (vdb did not change)", ev)
	case <-time.After(200 * time.Millisecond):
	}
}

// nextEvent waits for the next event, failing the test if none comes.
func nextEvent(t *testing.T, events <-chan storage.ChainChanged, after string) storage.ChainChanged {
	t.Helper()
	select {
	case ev := <-events:
		return ev
	case <-time.After(10 * time.Second):
		t.Fatalf("no ChainChanged event after %s", after)
	}
	return storage.ChainChanged{}
}

// testChainChanged: a chain edited behind storage's back is rescanned on
// the public call, and subscribers hear of it.
func testChainChanged(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0xf1, 0, mib)
	events, cancel := e.M.Subscribe()
	defer cancel()
	// Someone else inserts a base under the disk.
	base := e.Path("new-base.qcow2")
	e.Run("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	e.Run("qemu-img", "rebase", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, e.Path("vm-vda.qcow2"))
	problems, err := e.M.Check(e.Ctx)
	if err != nil || len(problems) != 1 || problems[0].Kind != storage.ProblemChainDiffers {
		t.Fatalf("Check before the rescan: %+v, %v", problems, err)
	}
	c, err := e.M.ChainChanged(e.Ctx, "vm", "vda", nil)
	if err != nil || len(c.Layers) != 2 {
		t.Fatalf("ChainChanged: %v, %v", c, err)
	}
	e.ExpectChain("vm", "vda", "vm-vda.qcow2", "new-base.qcow2")
	ev := nextEvent(t, events, "a rescan")
	if ev.Reason != "rescan" || len(ev.Before) != 1 || len(ev.After) != 2 {
		t.Fatalf("event %+v", ev)
	}
	e.Expect("vm", "vda", 0xf1, 0, mib)
	e.CheckClean("vm")
	if _, err := e.M.ChainChanged(e.Ctx, "vm", "vdz", nil); !errors.Is(err, storage.ErrInvalidArg) {
		t.Fatalf("rescan of an unknown disk: %v", err)
	}
}

// testCheckRepair: overlays of a recorded image that no record holds are
// reported, the recorded image as their shared base; Repair removes
// neither, empty or not: xlsnap removes only what its records made.
func testCheckRepair(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	empty, full := e.Path("orphan-empty.qcow2"), e.Path("orphan-data.qcow2")
	for _, p := range []string{empty, full} {
		e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vda.qcow2"), p)
	}
	e.Run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 64k", full)
	problems, err := e.M.Repair(e.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, p := range problems {
		if p.Fixed {
			t.Fatalf("repair claims to have fixed %+v", p)
		}
		got = append(got, string(p.Kind)+" "+filepath.Base(p.Path))
	}
	want := []string{"orphan-image orphan-data.qcow2", "orphan-image orphan-empty.qcow2", "shared-base vm-vda.qcow2"}
	if !slices.Equal(got, want) {
		t.Fatalf("repair found %q, want %q (%+v)", got, want, problems)
	}
	if last := problems[len(problems)-1]; !strings.Contains(last.Detail, "overlay "+full) || !strings.Contains(last.Detail, "overlay "+empty) {
		t.Fatalf("shared base without its users: %+v", last)
	}
	ExpectImage(t, full, "qcow2", 0x5a, 0, 64<<10)
	ExpectImage(t, empty, "qcow2", 0, 0, 64<<10)
}

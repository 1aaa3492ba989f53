package storage_test

// A device model killed in the middle of a live step, on real images:
// the step leaves on disk what QEMU leaves (made here with qemu-img and
// qemu-io: a commit half-copied, an overlay's header rewritten over
// tables never flushed, a transaction's overlays), and RecoverOffline
// must finish or undo it with every byte the guest wrote read back, the
// exact chain on disk and in the records, and qemu-img check clean. The
// real device model killed with SIGKILL is integration/live's.

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// errKilled is what a live call returns when its device model dies: the
// QMP connection closes.
var errKilled = fmt.Errorf("%w: QMP connection closed: EOF", errdefs.ErrHypervisor)

// dyingModel stands for the device model of a running domain that is
// killed in the middle of its first chain change: until then it answers
// which images it reads and writes (the test says); in that change it
// leaves on disk what QEMU would have (died), then fails as a closed
// connection does; dead, it answers nothing.
type dyingModel struct {
	uses, writes map[string]bool
	died         func()
	dead         bool
	// pivot, if set, is the active commit's pivot as far as the device
	// model got before it died (it marks, or not): see pivot_test.go.
	pivot func(storage.Pivot)
	// pivots are the pivots Commit was given.
	pivots []storage.Pivot
}

func (d *dyingModel) Uses(_ context.Context, image string) (bool, error) {
	if d.dead {
		return false, errKilled
	}
	return d.uses[image] || d.writes[image], nil
}

func (d *dyingModel) Writes(_ context.Context, image string) (bool, error) {
	if d.dead {
		return false, errKilled
	}
	return d.writes[image], nil
}

func (d *dyingModel) die() error {
	if !d.dead {
		d.dead = true
		if d.died != nil {
			d.died()
		}
	}
	return errKilled
}

func (d *dyingModel) Snapshot(context.Context, []storage.LiveOverlay) error { return d.die() }
func (d *dyingModel) InternalDelete(context.Context, string, string) error  { return d.die() }
func (d *dyingModel) Commit(_ context.Context, _, _ string, _ func(float64), p storage.Pivot) error {
	d.pivots = append(d.pivots, p)
	if d.pivot != nil && !d.dead {
		d.pivot(p)
	}
	return d.die()
}
func (d *dyingModel) Stream(context.Context, string, string, string, func(float64)) error {
	return d.die()
}

// running makes the device model of vm as it stands: it writes every
// disk's active layer and reads the rest of its chain.
func running(e *storagetest.Env, died func()) *dyingModel {
	e.T.Helper()
	d, err := e.M.Domain(e.Ctx, "vm")
	if err != nil {
		e.T.Fatal(err)
	}
	dm := &dyingModel{uses: map[string]bool{}, writes: map[string]bool{}, died: died}
	for _, disk := range d.Disks {
		dm.writes[disk.Active] = true
		for _, p := range d.Chain(disk.Active)[1:] {
			dm.uses[p] = true
		}
	}
	return dm
}

// qemuIO runs qemu-io commands on one image (format qcow2), as the
// device model's own writes land there.
func qemuIO(e *storagetest.Env, path string, cmds ...string) {
	e.T.Helper()
	args := []string{"-f", "qcow2"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	e.Run("qemu-io", append(args, path)...)
}

func write(pattern byte, off int) string {
	return fmt.Sprintf("write -P 0x%02x %d %d", pattern, off, bjMiB)
}

// expectKilled asserts the call the device model died in failed typed
// and left its intent, which every other change of the domain meets
// with a pending error that says what finishes it.
func expectKilled(e *storagetest.Env, err error) {
	e.T.Helper()
	if !errors.Is(err, errdefs.ErrHypervisor) && !errors.Is(err, storage.ErrPending) {
		e.T.Fatalf("the call the device model died in: %v, want its error or ErrPending", err)
	}
	if code := errdefs.CodeOf(err); code == errdefs.CodeInternal {
		e.T.Fatalf("untyped error (code %d): %v", code, err)
	}
	_, err = e.M.BlockPull(e.Ctx, "vm", "vdb", storage.BlockPullOptions{})
	if !errors.Is(err, storage.ErrPending) || !strings.Contains(err.Error(), "RecoverOffline") {
		e.T.Fatalf("a change while the live operation is pending: %v, want ErrPending naming RecoverOffline", err)
	}
}

func recoverOffline(e *storagetest.Env) {
	e.T.Helper()
	if err := e.M.RecoverOffline(e.Ctx, "vm"); err != nil {
		e.T.Fatalf("RecoverOffline: %v", err)
	}
	if err := e.M.RecoverOffline(e.Ctx, "vm"); err != nil {
		e.T.Fatalf("RecoverOffline again (nothing left): %v", err)
	}
}

func expectSnapshots(e *storagetest.Env, want ...string) {
	e.T.Helper()
	snaps, err := e.M.Snapshots(e.Ctx, "vm")
	if err != nil {
		e.T.Fatal(err)
	}
	var got []string
	for _, s := range snaps {
		got = append(got, s.Name)
	}
	if strings.Join(got, " ") != strings.Join(want, " ") {
		e.T.Fatalf("snapshots %v, want %v", got, want)
	}
}

// TestOfflineActiveCommit: a snapshot's delete commits the active layer
// into its state image live; the device model dies with the job half
// done (some of the overlay copied, the guest's writes since READY in
// both, its earlier ones in the overlay only). The commit is redone
// offline and nothing is lost.
func TestOfflineActiveCommit(t *testing.T) {
	e := bjEnv(t)
	e.NewDomain("vm", "vda", "vdb")
	e.Write("vm", "vda", 0x11, 0, bjMiB)
	e.Write("vm", "vda", 0x12, 3*bjMiB, bjMiB)
	if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "s1",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatal(err)
	}
	e.Write("vm", "vda", 0x21, 0, bjMiB)
	e.Write("vm", "vda", 0x22, bjMiB, bjMiB)
	base, top := e.Path("vm-vda.qcow2"), e.Path("vm-vda.s1")
	dm := running(e, func() {
		qemuIO(e, base, write(0x22, bjMiB))                   // copied by the job
		qemuIO(e, top, write(0x23, 2*bjMiB))                  // the guest, before READY
		qemuIO(e, top, write(0x24, 4*bjMiB), write(0x25, 0))  // the guest, after READY:
		qemuIO(e, base, write(0x24, 4*bjMiB), write(0x25, 0)) // into both
	})
	_, err := e.M.DeleteSnapshot(e.Ctx, "vm", "s1", storage.DeleteOptions{Live: dm})
	expectKilled(e, err)
	recoverOffline(e)
	bjExpectChain(e, "vm-vda.qcow2")
	expectSnapshots(e)
	bjExpectFiles(e, "vm-vda.qcow2", "vm-vdb.qcow2")
	for _, want := range []struct {
		p   byte
		off int
	}{{0x25, 0}, {0x22, 1}, {0x23, 2}, {0x12, 3}, {0x24, 4}, {0, 5}} {
		e.Expect("vm", "vda", want.p, want.off*bjMiB, bjMiB)
	}
	e.CheckClean("vm")
}

// TestOfflineIntermediateCommit: a blockcommit of a middle layer whose
// device model died, mid-job (the overlay still names the layer), and
// once done but before QEMU flushed the base's tables (the overlay's
// header names the base, which lacks the data: a SIGKILL loses QEMU's
// cached metadata, not what it wrote to the file). Either way the commit
// is redone from the layer, which stays until the operation commits.
func TestOfflineIntermediateCommit(t *testing.T) {
	for _, tc := range []struct {
		name string
		died func(e *storagetest.Env)
	}{
		{"mid-job", func(e *storagetest.Env) {
			qemuIO(e, e.Path("vm-vda.qcow2"), "write -P 0x22 1048576 65536") // a's first clusters copied
		}},
		{"done-unflushed", func(e *storagetest.Env) {
			e.Run("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vda.qcow2"), e.Path("vm-vda.b"))
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := bjEnv(t)
			bjChain(e, "a", "b")
			dm := running(e, func() {
				tc.died(e)
				qemuIO(e, e.Path("vm-vda.b"), write(0x44, 3*bjMiB)) // the guest, meanwhile
			})
			_, err := e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Top: e.Path("vm-vda.a"), Live: dm})
			expectKilled(e, err)
			recoverOffline(e)
			bjExpectChain(e, "vm-vda.b", "vm-vda.qcow2")
			bjExpectFiles(e, "vm-vda.b", "vm-vda.qcow2", "vm-vdb.qcow2")
			e.Expect("vm", "vda", 0x11, 0, bjMiB)
			e.Expect("vm", "vda", 0x22, bjMiB, bjMiB)
			e.Expect("vm", "vda", 0x33, 2*bjMiB, bjMiB)
			e.Expect("vm", "vda", 0x44, 3*bjMiB, bjMiB)
			storagetest.ExpectImage(t, e.Path("vm-vda.qcow2"), "qcow2", 0x22, bjMiB, bjMiB)
			e.CheckNoFault("vm")
		})
	}
}

// TestOfflineStream: a blockpull whose device model died. Mid-job (the
// active layer holds copies of some of what it reads through) it is
// undone: the chain stays. Once QEMU had switched the header but not
// flushed the copies, it is finished from the layers, still on disk.
func TestOfflineStream(t *testing.T) {
	for _, tc := range []struct {
		name  string
		died  func(e *storagetest.Env)
		chain []string
		files []string
	}{
		{"mid-job", func(e *storagetest.Env) {
			qemuIO(e, e.Path("vm-vda.b"), "write -P 0x22 1048576 524288")
		}, []string{"vm-vda.b", "vm-vda.a", "vm-vda.qcow2"}, []string{"vm-vda.a", "vm-vda.b", "vm-vda.qcow2", "vm-vdb.qcow2"}},
		{"done-unflushed", func(e *storagetest.Env) {
			e.Run("qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vda.qcow2"), e.Path("vm-vda.b"))
		}, []string{"vm-vda.b", "vm-vda.qcow2"}, []string{"vm-vda.b", "vm-vda.qcow2", "vm-vdb.qcow2"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := bjEnv(t)
			bjChain(e, "a", "b")
			dm := running(e, func() {
				tc.died(e)
				qemuIO(e, e.Path("vm-vda.b"), write(0x44, 3*bjMiB))
			})
			_, err := e.M.BlockPull(e.Ctx, "vm", "vda", storage.BlockPullOptions{Base: e.Path("vm-vda.qcow2"), Live: dm})
			expectKilled(e, err)
			recoverOffline(e)
			bjExpectChain(e, tc.chain...)
			bjExpectFiles(e, tc.files...)
			e.Expect("vm", "vda", 0x11, 0, bjMiB)
			e.Expect("vm", "vda", 0x22, bjMiB, bjMiB)
			e.Expect("vm", "vda", 0x33, 2*bjMiB, bjMiB)
			e.Expect("vm", "vda", 0x44, 3*bjMiB, bjMiB)
			e.CheckNoFault("vm")
		})
	}
}

// TestOfflineSnapshot: a live snapshot (vda external, vdb internal)
// whose device model died around its transaction. The rule: finished
// when every overlay is a whole qcow2 over its image and every internal
// snapshot is there (the guest's writes into the overlay after the
// switch are kept); else undone, removing only overlays that hold no
// data and that nothing names; an overlay with data beside a half-made
// transaction is never removed, and the operation stays pending.
func TestOfflineSnapshot(t *testing.T) {
	overlay := func(e *storagetest.Env) {
		e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vda.qcow2"), e.Path("vm-vda.s1"))
	}
	internal := func(e *storagetest.Env) { bjSnapshot(e, "-c", "s1", e.Path("vm-vdb.qcow2")) }
	for _, tc := range []struct {
		name     string
		died     func(e *storagetest.Env)
		finished bool
		stuck    bool // pending still: nothing removed
	}{
		{"switched", func(e *storagetest.Env) {
			overlay(e)
			internal(e)
			qemuIO(e, e.Path("vm-vda.s1"), write(0x77, 0)) // the guest, after the switch
		}, true, false},
		{"switched-empty", func(e *storagetest.Env) { overlay(e); internal(e) }, true, false},
		{"before", func(e *storagetest.Env) {}, false, false},
		{"overlay-only", overlay, false, false},
		{"overlay-cut-short", func(e *storagetest.Env) {
			internal(e)
			if err := os.WriteFile(e.Path("vm-vda.s1"), nil, 0o600); err != nil {
				e.T.Fatal(err)
			}
		}, false, false},
		{"data-without-internal", func(e *storagetest.Env) {
			overlay(e)
			qemuIO(e, e.Path("vm-vda.s1"), write(0x77, 0))
		}, false, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := bjEnv(t)
			e.NewDomain("vm", "vda", "vdb")
			e.Write("vm", "vda", 0x11, 0, bjMiB)
			e.Write("vm", "vdb", 0x51, 0, bjMiB)
			dm := running(e, func() { tc.died(e) })
			_, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "s1", Live: dm, Disks: []storage.SnapshotDiskSpec{
				{Target: "vda", Mode: storage.DiskExternal}, {Target: "vdb", Mode: storage.DiskInternal}}})
			expectKilled(e, err)
			if tc.stuck {
				err := e.M.RecoverOffline(e.Ctx, "vm")
				if !errors.Is(err, storage.ErrPending) || !strings.Contains(err.Error(), "holds") {
					t.Fatalf("RecoverOffline beside an overlay with data: %v, want ErrPending saying it holds data", err)
				}
				bjExpectFiles(e, "vm-vda.qcow2", "vm-vda.s1", "vm-vdb.qcow2")
				storagetest.ExpectImage(t, e.Path("vm-vda.s1"), "qcow2", 0x77, 0, bjMiB)
				return
			}
			recoverOffline(e)
			if tc.finished {
				expectSnapshots(e, "s1")
				bjExpectChain(e, "vm-vda.s1", "vm-vda.qcow2")
				bjExpectFiles(e, "vm-vda.qcow2", "vm-vda.s1", "vm-vdb.qcow2")
				if strings.Contains(tc.name, "empty") {
					e.Expect("vm", "vda", 0x11, 0, bjMiB)
				} else {
					e.Expect("vm", "vda", 0x77, 0, bjMiB)
				}
				storagetest.ExpectImage(t, e.Path("vm-vda.qcow2"), "qcow2", 0x11, 0, bjMiB)
				if !strings.Contains(e.Run("qemu-img", "snapshot", "-U", "-l", e.Path("vm-vdb.qcow2")), "s1") {
					t.Fatal("vdb lost its internal snapshot s1")
				}
			} else {
				expectSnapshots(e)
				bjExpectChain(e, "vm-vda.qcow2")
				bjExpectFiles(e, "vm-vda.qcow2", "vm-vdb.qcow2")
				e.Expect("vm", "vda", 0x11, 0, bjMiB)
				if strings.Contains(e.Run("qemu-img", "snapshot", "-U", "-l", e.Path("vm-vdb.qcow2")), "s1") {
					t.Fatal("vdb keeps the internal snapshot of an undone snapshot")
				}
			}
			e.Expect("vm", "vdb", 0x51, 0, bjMiB)
			e.CheckClean("vm")
		})
	}
}

// TestOfflineInternalDelete: the device model died before it deleted an
// internal snapshot of the image it writes: qemu-img deletes it.
func TestOfflineInternalDelete(t *testing.T) {
	e := bjEnv(t)
	e.NewDomain("vm", "vda", "vdb")
	e.Write("vm", "vda", 0x11, 0, bjMiB)
	if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "i1",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskInternal}}}); err != nil {
		t.Fatal(err)
	}
	e.Write("vm", "vda", 0x12, 0, bjMiB)
	_, err := e.M.DeleteSnapshot(e.Ctx, "vm", "i1", storage.DeleteOptions{Live: running(e, nil)})
	expectKilled(e, err)
	recoverOffline(e)
	expectSnapshots(e)
	if strings.Contains(e.Run("qemu-img", "snapshot", "-U", "-l", e.Path("vm-vda.qcow2")), "i1") {
		t.Fatal("the internal snapshot is still there")
	}
	e.Expect("vm", "vda", 0x12, 0, bjMiB)
	e.CheckClean("vm")
}

// TestRestartedDeviceModelKeepsOverlayData: the device model switched to
// a live snapshot's overlay, the guest wrote there, the device model
// died, and the domain was started again (from its definition, which
// still names the old image) before xlsnap's next call. The new device
// model does not write the overlay, so the snapshot is undone through it
// (RecoverLive), but the overlay holds writes found nowhere else: it is
// kept, and check lists it.
func TestRestartedDeviceModelKeepsOverlayData(t *testing.T) {
	e := bjEnv(t)
	e.NewDomain("vm", "vda", "vdb")
	e.Write("vm", "vda", 0x11, 0, bjMiB)
	dm := running(e, func() {
		e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vda.qcow2"), e.Path("vm-vda.s1"))
		e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vdb.qcow2"), e.Path("vm-vdb.s1"))
		qemuIO(e, e.Path("vm-vda.s1"), write(0x77, 0))
	})
	_, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "s1", Live: dm, Disks: []storage.SnapshotDiskSpec{
		{Target: "vda", Mode: storage.DiskExternal}, {Target: "vdb", Mode: storage.DiskExternal}}})
	expectKilled(e, err)
	if err := e.M.RecoverLive(e.Ctx, "vm", running(e, nil)); err != nil {
		t.Fatalf("RecoverLive through the restarted device model: %v", err)
	}
	expectSnapshots(e)
	bjExpectChain(e, "vm-vda.qcow2")
	bjExpectFiles(e, "vm-vda.qcow2", "vm-vda.s1", "vm-vdb.qcow2")
	storagetest.ExpectImage(t, e.Path("vm-vda.s1"), "qcow2", 0x77, 0, bjMiB)
	problems, err := e.M.Check(e.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	orphan := false
	for _, p := range problems {
		switch {
		case p.Kind == storage.ProblemOrphan && p.Path == e.Path("vm-vda.s1"):
			orphan = true
		case !p.Kind.Informational():
			t.Fatalf("check: %+v", problems)
		}
	}
	if !orphan {
		t.Fatalf("check: %+v, want the kept overlay listed as an orphan", problems)
	}
}

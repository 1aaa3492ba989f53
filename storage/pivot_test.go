package storage_test

// The pivot of an active commit and its mark (storage.Pivot, the step's
// Pivoting), on real images: the device model dies at each point of the
// pivot, leaving on disk what QEMU leaves (made with qemu-io), and the
// next process (Reopen: only the journal on disk remains) recovers. The
// real device model is integration/live's (pivot_test.go there).

import (
	"context"
	"errors"
	"testing"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// pivotEnv makes vm with vda's base (0x11 at 0, 0x12 at 3 MiB) under
// snapshot s1's overlay, the active layer (0x21 at 0, 0x22 at 1 MiB).
func pivotEnv(t *testing.T) (e *storagetest.Env, base, top string) {
	e = bjEnv(t)
	e.NewDomain("vm", "vda", "vdb")
	e.Write("vm", "vda", 0x11, 0, bjMiB)
	e.Write("vm", "vda", 0x12, 3*bjMiB, bjMiB)
	e.Write("vm", "vdb", 0x51, 0, bjMiB)
	if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "s1",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatal(err)
	}
	e.Write("vm", "vda", 0x21, 0, bjMiB)
	e.Write("vm", "vda", 0x22, bjMiB, bjMiB)
	return e, e.Path("vm-vda.qcow2"), e.Path("vm-vda.s1")
}

// inSync is the mirror job caught up: base holds what top does.
func inSync(e *storagetest.Env, base string) {
	qemuIO(e, base, write(0x21, 0), write(0x22, bjMiB))
}

func mark(e *storagetest.Env, p storage.Pivot, paused bool) {
	e.T.Helper()
	if p.Marked || p.Resume {
		e.T.Fatalf("a first pivot given %+v, want no earlier mark", p)
	}
	if err := p.Mark(e.Ctx, paused); err != nil {
		e.T.Fatalf("Mark: %v", err)
	}
}

// TestOfflinePivot: a snapshot delete's active commit whose device model
// dies around the pivot; the next process recovers offline. With the mark
// made the commit is not redone: the base holds every write, the guest's
// after the pivot too (redoing it, as before the mark existed, wrote the
// stale overlay's 0x21 over the guest's 0x66). With the mark taken back
// (job-complete refused, the guest resumed on the overlay) it is redone.
func TestOfflinePivot(t *testing.T) {
	for _, tc := range []struct {
		name  string
		pivot func(e *storagetest.Env, p storage.Pivot, base, top string)
		want  [6]byte // vda at 0..5 MiB
	}{
		{"pivoted", func(e *storagetest.Env, p storage.Pivot, base, top string) {
			inSync(e, base)
			mark(e, p, true)
			// Pivoted, resumed: the guest writes the base alone.
			qemuIO(e, base, write(0x66, 0), write(0x67, 4*bjMiB))
		}, [6]byte{0x66, 0x22, 0, 0x12, 0x67, 0}},
		{"marked", func(e *storagetest.Env, p storage.Pivot, base, top string) {
			inSync(e, base)
			mark(e, p, false)
		}, [6]byte{0x21, 0x22, 0, 0x12, 0, 0}},
		{"mark-taken-back", func(e *storagetest.Env, p storage.Pivot, base, top string) {
			inSync(e, base)
			mark(e, p, true)
			if err := p.Unmark(e.Ctx); err != nil {
				t.Fatalf("Unmark: %v", err)
			}
			// Resumed on the overlay; the job cancelled, so the base
			// is not written.
			qemuIO(e, top, write(0x68, 0), write(0x69, 2*bjMiB))
		}, [6]byte{0x68, 0x22, 0x69, 0x12, 0, 0}},
		{"unmarked-ready", func(e *storagetest.Env, p storage.Pivot, base, top string) {
			// READY, not yet paused: the guest's writes go to both.
			inSync(e, base)
			qemuIO(e, top, write(0x6a, 4*bjMiB))
			qemuIO(e, base, write(0x6a, 4*bjMiB))
		}, [6]byte{0x21, 0x22, 0, 0x12, 0x6a, 0}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e, base, top := pivotEnv(t)
			dm := running(e, nil)
			dm.pivot = func(p storage.Pivot) { tc.pivot(e, p, base, top) }
			_, err := e.M.DeleteSnapshot(e.Ctx, "vm", "s1", storage.DeleteOptions{Live: dm})
			expectKilled(e, err)
			if len(dm.pivots) != 1 {
				t.Fatalf("Commit called %d times", len(dm.pivots))
			}
			e.Reopen() // only what the journal holds on disk
			recoverOffline(e)
			bjExpectChain(e, "vm-vda.qcow2")
			expectSnapshots(e)
			bjExpectFiles(e, "vm-vda.qcow2", "vm-vdb.qcow2")
			for i, p := range tc.want {
				e.Expect("vm", "vda", p, i*bjMiB, bjMiB)
			}
			e.Expect("vm", "vdb", 0x51, 0, bjMiB)
			e.CheckClean("vm")
		})
	}
}

// liveModel is the device model of a domain that runs on: it reads and
// writes what the test says, and carries out a commit by answering
// commit (nil: done).
type liveModel struct {
	dyingModel
	commit func(storage.Pivot) error
}

func (l *liveModel) Commit(_ context.Context, _, _ string, _ func(float64), p storage.Pivot) error {
	l.pivots = append(l.pivots, p)
	return l.commit(p)
}

// TestLivePivotRecovery: the pivot's mark reaches the device model when
// the operation is recovered through it (RecoverLive: the device model
// ran on, xlsnap was cut short): Marked, and Resume as the mark says who
// paused the guest; a marked step goes to the device model even though
// it no longer uses the overlay (the pause may be left to end).
func TestLivePivotRecovery(t *testing.T) {
	for _, tc := range []struct {
		name   string
		paused bool
	}{{"paused", true}, {"was-paused", false}} {
		t.Run(tc.name, func(t *testing.T) {
			e, base, _ := pivotEnv(t)
			dm := running(e, nil)
			dm.pivot = func(p storage.Pivot) {
				inSync(e, base)
				mark(e, p, tc.paused)
				qemuIO(e, base, write(0x66, 0))
			}
			_, err := e.M.DeleteSnapshot(e.Ctx, "vm", "s1", storage.DeleteOptions{Live: dm})
			expectKilled(e, err)
			e.Reopen()
			// The device model pivoted: it writes the base now.
			lm := &liveModel{dyingModel: dyingModel{writes: map[string]bool{base: true, e.Path("vm-vdb.qcow2"): true}, uses: map[string]bool{}}}
			lm.commit = func(p storage.Pivot) error { return nil }
			if err := e.M.RecoverLive(e.Ctx, "vm", lm); err != nil {
				t.Fatalf("RecoverLive: %v", err)
			}
			if len(lm.pivots) != 1 || !lm.pivots[0].Marked || lm.pivots[0].Resume != tc.paused {
				t.Fatalf("the device model was given %+v, want one marked pivot, Resume %v", lm.pivots, tc.paused)
			}
			bjExpectChain(e, "vm-vda.qcow2")
			expectSnapshots(e)
			bjExpectFiles(e, "vm-vda.qcow2", "vm-vdb.qcow2")
			e.Expect("vm", "vda", 0x66, 0, bjMiB)
			e.Expect("vm", "vda", 0x22, bjMiB, bjMiB)
			e.Expect("vm", "vda", 0x12, 3*bjMiB, bjMiB)
			if _, err := e.M.DeleteSnapshot(e.Ctx, "vm", "nosuch", storage.DeleteOptions{}); !errors.Is(err, storage.ErrNoSnapshot) {
				t.Fatalf("a call after recovery: %v, want only ErrNoSnapshot (nothing pending)", err)
			}
		})
	}
}

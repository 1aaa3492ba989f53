package storage_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/internal/qemuimg"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// fullDiskEnv is an Env whose pool is a tmpfs of the given size (the state
// folder, with the database and the journal, stays on the ordinary disk).
func fullDiskEnv(t *testing.T, size string) *storagetest.Env {
	t.Helper()
	pool := t.TempDir()
	if err := syscall.Mount("tmpfs", pool, "tmpfs", 0, "size="+size+",mode=0700"); err != nil {
		if errors.Is(err, syscall.EPERM) && os.Geteuid() != 0 {
			t.Skipf("mounting a small tmpfs needs root (CI runs as root): %v", err)
		}
		t.Fatalf("mount -t tmpfs -o size=%s: %v", size, err)
	}
	t.Cleanup(func() {
		// A child another parallel test forks holds copies of every open
		// descriptor until its exec closes them: EBUSY for a moment.
		err := syscall.Unmount(pool, 0)
		for i := 0; errors.Is(err, syscall.EBUSY) && i < 40; i++ {
			time.Sleep(50 * time.Millisecond)
			err = syscall.Unmount(pool, 0)
		}
		if err != nil {
			t.Errorf("unmount %s: %v", pool, err)
		}
	})
	storage.Register("dir", dir.New)
	e := &storagetest.Env{T: t, Ctx: context.Background(), Pool: pool, StateDir: t.TempDir()}
	e.Config = storage.Config{StateDir: e.StateDir, Pools: []storage.PoolConfig{{Name: "small", Type: "dir", Path: pool}}}
	e.Reopen()
	t.Cleanup(func() { e.M.Close() })
	return e
}

// fullDiskFree is what an unprivileged writer can still put on path's
// filesystem.
func fullDiskFree(t *testing.T, path string) int64 {
	t.Helper()
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// fullDiskFill writes a filler file so that about leave bytes stay free, and
// returns its path.
func fullDiskFill(t *testing.T, e *storagetest.Env, leave int64) string {
	t.Helper()
	filler := filepath.Join(e.Pool, "filler")
	n := fullDiskFree(t, e.Pool) - leave
	if n <= 0 {
		t.Fatalf("only %d bytes free, cannot leave %d", n+leave, leave)
	}
	if err := os.WriteFile(filler, make([]byte, n), 0o600); err != nil {
		t.Fatalf("writing the filler: %v", err)
	}
	if free := fullDiskFree(t, e.Pool); free > leave+64<<10 || free < leave-64<<10 {
		t.Fatalf("%d bytes free after filling, want about %d", free, leave)
	}
	return filler
}

// fullDiskOverlayCost measures what a new overlay of image takes on the pool's
// filesystem.
func fullDiskOverlayCost(t *testing.T, e *storagetest.Env, image string) int64 {
	t.Helper()
	probe := e.Path("probe.qcow2")
	before := fullDiskFree(t, e.Pool)
	e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", image, probe)
	cost := before - fullDiskFree(t, e.Pool)
	if err := os.Remove(probe); err != nil {
		t.Fatal(err)
	}
	if cost <= 0 {
		t.Fatalf("an overlay costs %d bytes?", cost)
	}
	return cost
}

func fullDiskSnap(t *testing.T, e *storagetest.Env, name string) {
	t.Helper()
	if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: name, DomainXML: "<domain/>",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatalf("CreateSnapshot %s: %v", name, err)
	}
}

func fullDiskWithout(files []string, name string) []string {
	return slices.DeleteFunc(slices.Clone(files), func(f string) bool { return f == name })
}

// TestFullDiskSnapshotRollsBack: an external snapshot of two disks on a
// filesystem with room for one overlay only. The first overlay is made,
// the second fails with ENOSPC (qemu-img's "No space left on device",
// qemuimg.ErrNoSpace); the journal removes the first, so the pool, the
// chains, the snapshot tree and the data are as before and Check finds
// nothing. With space freed, the same snapshot succeeds.
func TestFullDiskSnapshotRollsBack(t *testing.T) {
	t.Parallel()
	e := fullDiskEnv(t, "2m")
	e.NewDomain("vm", "vda", "vdb")
	e.Write("vm", "vda", 0x11, 0, 64<<10)
	e.Write("vm", "vdb", 0x21, 64<<10, 64<<10)
	cost := fullDiskOverlayCost(t, e, e.Path("vm-vda.qcow2"))
	files := e.PoolFiles()
	filler := fullDiskFill(t, e, cost+cost/2)

	_, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "s1", DomainXML: "<domain/>",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}, {Target: "vdb", Mode: storage.DiskExternal}}})
	if !errors.Is(err, qemuimg.ErrNoSpace) {
		t.Fatalf("CreateSnapshot on a full disk: %v, want qemuimg.ErrNoSpace", err)
	}
	// The second overlay is the one that failed, so the first was made.
	if !strings.Contains(err.Error(), "vm-vdb.s1") {
		t.Fatalf("the failure is not the second overlay's: %v", err)
	}
	t.Logf("CreateSnapshot: %v", err)

	if got := fullDiskWithout(e.PoolFiles(), "filler"); !slices.Equal(got, files) {
		t.Fatalf("pool after the failed snapshot %v, want %v (the first overlay left behind?)", got, files)
	}
	e.ExpectChain("vm", "vda", "vm-vda.qcow2")
	e.ExpectChain("vm", "vdb", "vm-vdb.qcow2")
	concExpectTree(t, e.Ctx, e.M, "vm", nil)
	if d, err := e.M.Domain(e.Ctx, "vm"); err != nil || d.Current != "" || len(d.Images) != 2 {
		t.Fatalf("domain after the failed snapshot: %+v, %v", d, err)
	}
	e.CheckClean("vm") // no pending intent, no orphan, images clean
	e.Expect("vm", "vda", 0x11, 0, 64<<10)
	e.Expect("vm", "vdb", 0x21, 64<<10, 64<<10)
	e.Expect("vm", "vdb", 0x00, 0, 64<<10)

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "s1", DomainXML: "<domain/>",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}, {Target: "vdb", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatalf("CreateSnapshot with space again: %v", err)
	}
	e.ExpectChain("vm", "vda", "vm-vda.s1", "vm-vda.qcow2")
	e.ExpectChain("vm", "vdb", "vm-vdb.s1", "vm-vdb.qcow2")
	concExpectTree(t, e.Ctx, e.M, "vm", []string{"s1"})
	e.Expect("vm", "vda", 0x11, 0, 64<<10)
	e.Expect("vm", "vdb", 0x21, 64<<10, 64<<10)
	e.CheckClean("vm")
}

// TestFullDiskMergeRollsBack: deleting a snapshot whose child holds more
// data than its state image pulls the state image up into the child
// (qemu-img rebase copies the base's two 128 KiB extents into it). With
// room for about one of them, the rebase fails with ENOSPC part way; the
// journal undoes it (the child goes back to its old backing file, which
// shows the same data as what was copied), so nothing is lost: both
// snapshots are still there, the chain and every image are as before
// (qemu-img check clean), and each snapshot still reads its data. With
// space freed, the same delete succeeds.
func TestFullDiskMergeRollsBack(t *testing.T) {
	t.Parallel()
	e := fullDiskEnv(t, "2m")
	const k = 1 << 10
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0x81, 0, 128*k)
	e.Write("vm", "vda", 0x84, 512*k, 128*k)
	fullDiskSnap(t, e, "s1")
	e.Write("vm", "vda", 0x82, 1<<20, 512*k)
	fullDiskSnap(t, e, "s2")
	e.Write("vm", "vda", 0x83, 2<<20, 64*k)
	expectS1 := func(path string) {
		t.Helper()
		storagetest.ExpectImage(t, path, "qcow2", 0x81, 0, 128*k)
		storagetest.ExpectImage(t, path, "qcow2", 0x84, 512*k, 128*k)
		storagetest.ExpectImage(t, path, "qcow2", 0x00, 1<<20, 512*k)
	}
	expectS2 := func(path string) {
		t.Helper()
		storagetest.ExpectImage(t, path, "qcow2", 0x81, 0, 128*k)
		storagetest.ExpectImage(t, path, "qcow2", 0x84, 512*k, 128*k)
		storagetest.ExpectImage(t, path, "qcow2", 0x82, 1<<20, 512*k)
	}
	expectNow := func() {
		t.Helper()
		p, _ := e.Active("vm", "vda")
		expectS2(p)
		storagetest.ExpectImage(t, p, "qcow2", 0x83, 2<<20, 64*k)
	}
	files := e.PoolFiles()
	held := fullDiskAllocated(t, e.Path("vm-vda.s1"))
	filler := fullDiskFill(t, e, 192*k)

	r, err := e.M.DeleteSnapshot(e.Ctx, "vm", "s1", storage.DeleteOptions{})
	if !errors.Is(err, qemuimg.ErrNoSpace) {
		t.Fatalf("DeleteSnapshot on a full disk: %v, want qemuimg.ErrNoSpace", err)
	}
	t.Logf("DeleteSnapshot: %v", err)
	// The pull-up must have failed part way, or its rollback is untested.
	after := fullDiskAllocated(t, e.Path("vm-vda.s1"))
	t.Logf("vm-vda.s1 held %d KiB of its own before the failed pull-up, %d KiB after", held/k, after/k)
	if after <= held {
		t.Fatalf("the pull-up failed before copying anything: %d -> %d KiB", held/k, after/k)
	}
	if errors.Is(err, storage.ErrPending) || len(r.Deleted) != 0 {
		t.Fatalf("the failed delete was not rolled back: %v, report %+v", err, r)
	}
	if got := fullDiskWithout(e.PoolFiles(), "filler"); !slices.Equal(got, files) {
		t.Fatalf("pool after the failed delete %v, want %v", got, files)
	}
	concExpectTree(t, e.Ctx, e.M, "vm", []string{"s1", "s2"})
	if s2, err := e.M.Snapshot(e.Ctx, "vm", "s2"); err != nil || s2.Parent != "s1" || s2.DomainXML != "<domain/>" {
		t.Fatalf("s2 after the failed delete: %+v, %v", s2, err)
	}
	e.ExpectChain("vm", "vda", "vm-vda.s2", "vm-vda.s1", "vm-vda.qcow2")
	e.CheckClean("vm") // includes: vm-vda.s1's header still names vm-vda.qcow2
	expectNow()
	expectS2(e.Path("vm-vda.s1"))
	expectS1(e.Path("vm-vda.qcow2"))

	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	r, err = e.M.DeleteSnapshot(e.Ctx, "vm", "s1", storage.DeleteOptions{})
	if err != nil {
		t.Fatalf("DeleteSnapshot with space again: %v", err)
	}
	// The pull-up ends on the user's name for the merged image.
	if len(r.Disks) != 1 || r.Disks[0].Action != storage.ActionPulledUp || r.Disks[0].Kept != e.Path("vm-vda.qcow2") || r.Disks[0].Removed != e.Path("vm-vda.s1") {
		t.Fatalf("report %+v", r.Disks)
	}
	e.ExpectChain("vm", "vda", "vm-vda.s2", "vm-vda.qcow2")
	concExpectTree(t, e.Ctx, e.M, "vm", []string{"s2"})
	expectNow()
	e.CheckClean("vm")
	if _, err := e.M.Revert(e.Ctx, "vm", "s2", storage.RevertOptions{}); err != nil {
		t.Fatal(err)
	}
	p, _ := e.Active("vm", "vda")
	expectS2(p)
	storagetest.ExpectImage(t, p, "qcow2", 0x00, 2<<20, 64*k)
	e.CheckClean("vm")
}

// fullDiskAllocated is the data an image holds itself, not its backing files.
func fullDiskAllocated(t *testing.T, path string) int64 {
	t.Helper()
	n, err := chain.Allocated(path, chain.FormatQcow2)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// fullDiskCommitFails sets up a delete in the commit direction (the state
// image holds 1 MiB, its child two extents of 128 KiB) on a filesystem
// with room for about one extent, runs it and checks it fails as a
// pending operation: the commit into the state image cannot be undone, so
// the journal keeps it to finish, and the disk still reads all its data
// through the child. It returns the filler.
func fullDiskCommitFails(t *testing.T, e *storagetest.Env) string {
	t.Helper()
	const k = 1 << 10
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0x71, 0, 1<<20)
	fullDiskSnap(t, e, "s1")
	e.Write("vm", "vda", 0x72, 1<<20, 128*k)
	e.Write("vm", "vda", 0x73, 1<<20+512*k, 128*k)
	filler := fullDiskFill(t, e, 192*k)
	_, err := e.M.DeleteSnapshot(e.Ctx, "vm", "s1", storage.DeleteOptions{})
	if !errors.Is(err, storage.ErrPending) || !errors.Is(err, qemuimg.ErrNoSpace) {
		t.Fatalf("DeleteSnapshot committing on a full disk: %v, want ErrPending and qemuimg.ErrNoSpace", err)
	}
	t.Logf("DeleteSnapshot: %v", err)
	problems, err := e.M.Check(e.Ctx)
	if err != nil || len(problems) != 1 || problems[0].Kind != storage.ProblemPending || problems[0].Domain != "vm" {
		t.Fatalf("Check after the failed commit: %+v, %v", problems, err)
	}
	e.ExpectChain("vm", "vda", "vm-vda.s1", "vm-vda.qcow2")
	e.Expect("vm", "vda", 0x71, 0, 1<<20)
	e.Expect("vm", "vda", 0x72, 1<<20, 128*k)
	e.Expect("vm", "vda", 0x73, 1<<20+512*k, 128*k)
	return filler
}

// TestFullDiskCommitPending: a merge in the commit direction that runs
// out of space cannot be rolled back (the state image is half written),
// so it fails with ErrPending and stays in the journal; once space is
// freed, Repair finishes it: the snapshot is gone, the disk is its state
// image with the child's data in it, and Check finds nothing.
func TestFullDiskCommitPending(t *testing.T) {
	t.Parallel()
	e := fullDiskEnv(t, "4m")
	filler := fullDiskCommitFails(t, e)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	problems, err := e.M.Repair(e.Ctx)
	if err != nil || len(problems) != 0 {
		t.Fatalf("Repair with space again: %+v, %v", problems, err)
	}
	e.ExpectChain("vm", "vda", "vm-vda.qcow2")
	concExpectTree(t, e.Ctx, e.M, "vm", nil)
	e.Expect("vm", "vda", 0x71, 0, 1<<20)
	e.Expect("vm", "vda", 0x72, 1<<20, 128<<10)
	e.Expect("vm", "vda", 0x00, 1<<20+128<<10, 384<<10)
	e.Expect("vm", "vda", 0x73, 1<<20+512<<10, 128<<10)
	if files := e.PoolFiles(); !slices.Equal(files, []string{"vm-vda.qcow2"}) {
		t.Fatalf("pool after Repair: %v", files)
	}
	e.CheckClean("vm")
}

// TestFullDiskPendingBlocksRevert: while that delete is pending, its
// snapshot's state image holds part of the child's data, so a revert to
// the snapshot must not go ahead on the old metadata: it must either be
// refused (ErrPending) or first finish the delete (and then find no
// snapshot). Either way Repair then leaves a consistent domain.
func TestFullDiskPendingBlocksRevert(t *testing.T) {
	t.Parallel()
	e := fullDiskEnv(t, "4m")
	filler := fullDiskCommitFails(t, e)
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	_, err := e.M.Revert(e.Ctx, "vm", "s1", storage.RevertOptions{})
	if !errors.Is(err, storage.ErrPending) && !errors.Is(err, storage.ErrNoSnapshot) {
		t.Fatalf("Revert to a snapshot whose delete is pending: %v, want ErrPending or ErrNoSnapshot", err)
	}
	if problems, err := e.M.Repair(e.Ctx); err != nil || len(problems) != 0 {
		t.Fatalf("Repair: %+v, %v", problems, err)
	}
	e.ExpectChain("vm", "vda", "vm-vda.qcow2")
	concExpectTree(t, e.Ctx, e.M, "vm", nil)
	e.Expect("vm", "vda", 0x72, 1<<20, 128<<10)
	e.Expect("vm", "vda", 0x73, 1<<20+512<<10, 128<<10)
	e.CheckClean("vm")
}

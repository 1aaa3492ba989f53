package storage_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// The tests of coalescing and of the exact rule for internal snapshots:
// real images, every internal snapshot and every snapshot's state read
// back whole (qemu-img convert, with -l for an internal snapshot) and
// compared with what it must hold, MiB by MiB.

const (
	coMiB   = 1 << 20
	coDiskN = 16 // MiB per disk (storagetest.NewDomain)
)

// coContent is what a disk shows: each MiB's pattern (0 for zeros).
type coContent [coDiskN]byte

// coWorld is a domain "vm" with disk vda and a model of what it holds.
type coWorld struct {
	t   *testing.T
	e   *storagetest.Env
	cur coContent
}

func newCoWorld(t *testing.T, pool storage.PoolConfig) *coWorld {
	t.Helper()
	storage.Register("dir", dir.New)
	e := storagetest.NewEnv(t, "dir")
	if pool.MaxDepth != 0 {
		e.M.Close()
		e.Config.Pools[0].MaxDepth = pool.MaxDepth
		e.M = nil
		e.Reopen()
	}
	e.NewDomain("vm", "vda")
	return &coWorld{t: t, e: e}
}

// write writes pattern p over MiBs [off, off+n) of the active layer.
func (w *coWorld) write(p byte, off, n int) {
	w.t.Helper()
	w.e.Write("vm", "vda", p, off*coMiB, n*coMiB)
	for i := off; i < off+n; i++ {
		w.cur[i] = p
	}
}

// snap takes snapshot name of vda in mode and returns what it holds.
func (w *coWorld) snap(name string, mode storage.DiskMode) coContent {
	w.t.Helper()
	if _, err := w.e.M.CreateSnapshot(w.e.Ctx, "vm", storage.SnapshotSpec{Name: name, DomainXML: "<domain/>",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: mode}}}); err != nil {
		w.t.Fatalf("snapshot %s: %v", name, err)
	}
	return w.cur
}

func (w *coWorld) del(name string) *storage.DeleteReport {
	w.t.Helper()
	r, err := w.e.M.DeleteSnapshot(w.e.Ctx, "vm", name, storage.DeleteOptions{})
	if err != nil {
		w.t.Fatalf("delete %s: %v", name, err)
	}
	return r
}

func (w *coWorld) path(name string) string { return w.e.Path(name) }

// readImage reads what image shows (its chain), or with snapshot set what
// it held at that internal snapshot, as a raw file's bytes.
func readImage(t *testing.T, image, snapshot string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "view.raw")
	args := []string{"convert", "-U", "-f", "qcow2", "-O", "raw"}
	if snapshot != "" {
		args = append(args, "-l", "snapshot.name="+snapshot)
	}
	storagetest.Run(t, "qemu-img", append(args, image, out)...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// expectView asserts image (at internal snapshot snapshot, "" for its
// chain as it is) holds c.
func expectView(t *testing.T, image, snapshot string, c coContent) {
	t.Helper()
	b := readImage(t, image, snapshot)
	if len(b) != coDiskN*coMiB {
		t.Fatalf("%s@%s: %d bytes", image, snapshot, len(b))
	}
	for i, p := range c {
		if chunk := b[i*coMiB : (i+1)*coMiB]; !bytes.Equal(chunk, bytes.Repeat([]byte{p}, coMiB)) {
			t.Fatalf("%s@%q MiB %d: want 0x%02x, read 0x%02x...", image, snapshot, i, p, chunk[0])
		}
	}
}

// expectChain asserts vda's chain on disk (qemu-img's reading) and in
// the records, top first, as file names.
func (w *coWorld) expectChain(want ...string) {
	w.t.Helper()
	w.e.ExpectChain("vm", "vda", want...)
	active, _ := w.e.Active("vm", "vda")
	out := storagetest.Run(w.t, "qemu-img", "info", "-U", "--backing-chain", "-f", "qcow2", active)
	var got []string
	for _, l := range strings.Split(out, "\n") {
		if f, ok := strings.CutPrefix(l, "image: "); ok {
			got = append(got, filepath.Base(f))
		}
	}
	if !slices.Equal(got, want) {
		w.t.Fatalf("chain on disk %v, want %v", got, want)
	}
}

// TestInternalSnapshotRule deletes external snapshot e1, whose state
// image X (vm-vda.e0) and overlay C (vm-vda.e1) are the pair a delete
// merges, with an internal snapshot below X (in the user's image), inside
// X, inside C or above C (in e2's overlay), and with the cheaper
// direction either way. Only an internal snapshot in C keeps the pair
// (both directions change what it sees); one in X allows only the commit
// down (a pull-up removes X); one below or above changes nothing. Every
// internal snapshot, every snapshot's state and the disk read exactly
// what they held before, whole.
func TestInternalSnapshotRule(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		where string // below, inside-x, inside-c, above
		// bigX makes X hold more than C: the commit down is cheaper.
		bigX       bool
		wantAction storage.DiskAction
		wantChain  []string
	}{
		{"below", true, storage.ActionMergedDown, []string{"vm-vda.e0", "vm-vda.qcow2"}},
		{"below", false, storage.ActionPulledUp, []string{"vm-vda.e1", "vm-vda.qcow2"}},
		{"inside-x", true, storage.ActionMergedDown, []string{"vm-vda.e0", "vm-vda.qcow2"}},
		// The pull-up would be cheaper, but it removes X and its internal
		// snapshot: the commit down it is.
		{"inside-x", false, storage.ActionMergedDown, []string{"vm-vda.e0", "vm-vda.qcow2"}},
		{"inside-c", true, storage.ActionInternalAbove, []string{"vm-vda.e1", "vm-vda.e0", "vm-vda.qcow2"}},
		{"inside-c", false, storage.ActionInternalAbove, []string{"vm-vda.e1", "vm-vda.e0", "vm-vda.qcow2"}},
		{"above", true, storage.ActionMergedDown, []string{"vm-vda.e2", "vm-vda.e0", "vm-vda.qcow2"}},
		{"above", false, storage.ActionPulledUp, []string{"vm-vda.e2", "vm-vda.e1", "vm-vda.qcow2"}},
	} {
		name := tc.where + "/pull-up-cheaper"
		if tc.bigX {
			name = tc.where + "/commit-down-cheaper"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			w := newCoWorld(t, storage.PoolConfig{})
			internals := map[string]coContent{} // internal snapshot: what it holds
			at := map[string]string{}           // internal snapshot: the image holding it
			external := map[string]coContent{}
			internal := func(name string) {
				active, _ := w.e.Active("vm", "vda")
				internals[name], at[name] = w.snap(name, storage.DiskInternal), active
			}
			xLen, cLen := 3, 8
			if tc.bigX {
				xLen, cLen = 8, 2
			}
			w.write(0x10, 0, 2)
			if tc.where == "below" {
				internal("ib")
				w.write(0x11, 0, 1)
			}
			external["e0"] = w.snap("e0", storage.DiskExternal)
			w.write(0x20, 1, xLen)
			if tc.where == "inside-x" {
				internal("ix")
				w.write(0x21, 1, 1)
			}
			external["e1"] = w.snap("e1", storage.DiskExternal)
			w.write(0x30, 4, cLen)
			if tc.where == "inside-c" {
				internal("ic")
				w.write(0x31, 4, 1)
			}
			if tc.where == "above" {
				external["e2"] = w.snap("e2", storage.DiskExternal)
				w.write(0x40, 12, 2)
				internal("ig")
				w.write(0x41, 12, 1)
			}
			r := w.del("e1")
			delete(external, "e1")
			if len(r.Disks) != 1 || r.Disks[0].Action != tc.wantAction {
				t.Fatalf("delete e1: %+v, want %s", r.Disks, tc.wantAction)
			}
			w.expectChain(tc.wantChain...)
			active, _ := w.e.Active("vm", "vda")
			expectView(t, active, "", w.cur)
			for name, c := range internals {
				expectView(t, at[name], name, c)
			}
			for name, c := range external {
				s, err := w.e.M.Snapshot(w.e.Ctx, "vm", name)
				if err != nil {
					t.Fatal(err)
				}
				expectView(t, s.Disks[0].Image, "", c)
			}
			w.e.CheckClean("vm")
		})
	}
}

// TestCoalesceUnblockedByInternalDelete: an external snapshot's images
// cannot merge while the overlay holds an internal snapshot; deleting
// that internal snapshot merges them right away.
func TestCoalesceUnblockedByInternalDelete(t *testing.T) {
	t.Parallel()
	w := newCoWorld(t, storage.PoolConfig{})
	w.write(0x11, 0, 2)
	e0 := w.snap("e0", storage.DiskExternal)
	w.write(0x12, 1, 2)
	w.snap("e1", storage.DiskExternal)
	w.write(0x13, 2, 2)
	w.snap("i1", storage.DiskInternal)
	w.write(0x14, 3, 2)
	r := w.del("e1")
	if r.Disks[0].Action != storage.ActionInternalAbove || len(r.Coalesced) != 0 {
		t.Fatalf("delete e1: %+v, coalesced %+v", r.Disks, r.Coalesced)
	}
	w.expectChain("vm-vda.e1", "vm-vda.e0", "vm-vda.qcow2")
	r = w.del("i1")
	if len(r.Coalesced) != 1 || r.Coalesced[0].Layer != w.path("vm-vda.e0") {
		t.Fatalf("delete i1 coalesced %+v, want vm-vda.e0 merged", r.Coalesced)
	}
	if len(w.e.Chain("vm", "vda")) != 2 {
		t.Fatalf("chain %v", w.e.Chain("vm", "vda"))
	}
	active, _ := w.e.Active("vm", "vda")
	expectView(t, active, "", w.cur)
	s, err := w.e.M.Snapshot(w.e.Ctx, "vm", "e0")
	if err != nil {
		t.Fatal(err)
	}
	expectView(t, s.Disks[0].Image, "", e0)
	w.e.CheckClean("vm")
}

// noMeta takes a NO_METADATA external snapshot of vda: an overlay no
// record keeps, over a layer nothing needs any more.
func (w *coWorld) noMeta(name string) {
	w.t.Helper()
	if _, err := w.e.M.CreateSnapshot(w.e.Ctx, "vm", storage.SnapshotSpec{Name: name, NoMetadata: true,
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		w.t.Fatalf("snapshot %s: %v", name, err)
	}
}

// TestCoalesceLeavesWhatWasMergeable: layers a NO_METADATA snapshot left
// are no delete's to merge (a backup may be reading them): check lists
// them, a dry run names them and changes nothing, Coalesce merges them.
func TestCoalesceLeavesWhatWasMergeable(t *testing.T) {
	t.Parallel()
	w := newCoWorld(t, storage.PoolConfig{})
	w.write(0x51, 0, 2)
	w.noMeta("b1")
	w.write(0x52, 1, 2)
	w.noMeta("b2")
	w.write(0x53, 2, 2)
	e1 := w.snap("e1", storage.DiskExternal)
	w.write(0x54, 3, 2)
	w.snap("e2", storage.DiskExternal)
	w.write(0x55, 4, 1)
	// e2's delete merges its own pair; the layers below e1's state stay.
	r := w.del("e2")
	if len(r.Coalesced) != 0 {
		t.Fatalf("the delete merged what it did not free: %+v", r.Coalesced)
	}
	before := w.e.Chain("vm", "vda")
	if len(before) != 4 {
		t.Fatalf("chain %v", before)
	}
	problems, err := w.e.M.Check(w.e.Ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) != 1 || problems[0].Kind != storage.ProblemCoalescible || problems[0].Disk != "vda" ||
		!strings.Contains(problems[0].Detail, "2 layers shorter") || !problems[0].Kind.Informational() {
		t.Fatalf("check: %+v, want one coalescible finding of 2 layers", problems)
	}
	files := w.e.PoolFiles()
	dry, err := w.e.M.Coalesce(w.e.Ctx, "vm", storage.CoalesceOptions{DryRun: true})
	if err != nil {
		t.Fatal(err)
	}
	if !dry.DryRun || len(dry.Merges) != 2 || dry.Merges[0].Layer != w.path("vm-vda.b1") || dry.Merges[1].Layer != w.path("vm-vda.qcow2") {
		t.Fatalf("dry run %+v", dry)
	}
	if !slices.Equal(w.e.PoolFiles(), files) || !slices.Equal(w.e.Chain("vm", "vda"), before) {
		t.Fatal("the dry run changed something")
	}
	rep, err := w.e.M.Coalesce(w.e.Ctx, "", storage.CoalesceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Merges) != 2 {
		t.Fatalf("coalesce: %+v", rep.Merges)
	}
	if c := w.e.Chain("vm", "vda"); len(c) != 2 {
		t.Fatalf("chain after coalescing %v, want e1's state and the active layer", c)
	}
	active, _ := w.e.Active("vm", "vda")
	expectView(t, active, "", w.cur)
	s, err := w.e.M.Snapshot(w.e.Ctx, "vm", "e1")
	if err != nil {
		t.Fatal(err)
	}
	expectView(t, s.Disks[0].Image, "", e1)
	w.e.CheckClean("vm")
	// Nothing left: a second run merges nothing.
	if rep, err = w.e.M.Coalesce(w.e.Ctx, "vm", storage.CoalesceOptions{}); err != nil || len(rep.Merges) != 0 {
		t.Fatalf("second coalesce: %+v, %v", rep, err)
	}
}

// TestCoalesceKeepsSharedBase: a layer another image is backed by (a
// clone no record holds) is no idle layer's to lose: kept until the
// clone goes, then merged by Coalesce.
func TestCoalesceKeepsSharedBase(t *testing.T) {
	t.Parallel()
	w := newCoWorld(t, storage.PoolConfig{})
	w.write(0x61, 0, 2)
	w.snap("e0", storage.DiskExternal)
	w.write(0x62, 1, 2)
	w.noMeta("b1")
	w.write(0x63, 2, 2)
	// A linked clone of vm-vda.e0, made by someone else.
	clone := w.path("clone.qcow2")
	w.e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", w.path("vm-vda.e0"), clone)
	rep, err := w.e.M.Coalesce(w.e.Ctx, "vm", storage.CoalesceOptions{})
	if err != nil || len(rep.Merges) != 0 {
		t.Fatalf("coalesce with a clone on the layer: %+v, %v", rep, err)
	}
	w.expectChain("vm-vda.b1", "vm-vda.e0", "vm-vda.qcow2")
	if err := os.Remove(clone); err != nil {
		t.Fatal(err)
	}
	if rep, err = w.e.M.Coalesce(w.e.Ctx, "vm", storage.CoalesceOptions{}); err != nil || len(rep.Merges) != 1 {
		t.Fatalf("coalesce once the clone is gone: %+v, %v", rep, err)
	}
	if c := w.e.Chain("vm", "vda"); len(c) != 2 {
		t.Fatalf("chain %v", c)
	}
	active, _ := w.e.Active("vm", "vda")
	expectView(t, active, "", w.cur)
	w.e.CheckClean("vm")
}

// TestRevertCoalescesWhatItFrees: after a revert the abandoned branch
// goes, and with it what kept the layer under it shared: the revert
// merges that layer.
func TestRevertCoalescesWhatItFrees(t *testing.T) {
	t.Parallel()
	w := newCoWorld(t, storage.PoolConfig{})
	w.write(0x71, 0, 2)
	s1 := w.snap("s1", storage.DiskExternal)
	w.write(0x72, 1, 2)
	s2 := w.snap("s2", storage.DiskExternal)
	w.write(0x73, 2, 2)
	if _, err := w.e.M.Revert(w.e.Ctx, "vm", "s1", storage.RevertOptions{}); err != nil {
		t.Fatal(err)
	}
	w.cur = s1
	w.write(0x74, 3, 1)
	// s1's state now backs vm-vda.s1 (s2's state) and the new overlay:
	// kept, shared.
	if r := w.del("s1"); r.Disks[0].Action != storage.ActionSharedBase {
		t.Fatalf("delete s1: %+v", r.Disks)
	}
	// Back to s2: the overlay of the revert to s1 goes, vm-vda.qcow2 has
	// one child again and no snapshot: merged.
	if _, err := w.e.M.Revert(w.e.Ctx, "vm", "s2", storage.RevertOptions{}); err != nil {
		t.Fatal(err)
	}
	w.cur = s2
	if c := w.e.Chain("vm", "vda"); len(c) != 2 {
		t.Fatalf("chain after the revert %v, want s2's state and the new overlay", c)
	}
	active, _ := w.e.Active("vm", "vda")
	expectView(t, active, "", s2)
	s, err := w.e.M.Snapshot(w.e.Ctx, "vm", "s2")
	if err != nil {
		t.Fatal(err)
	}
	expectView(t, s.Disks[0].Image, "", s2)
	w.e.CheckClean("vm")
}

// TestMaxDepth: a pool allowing 3 layers takes two external snapshots;
// a third is refused with the layers named, nothing changed; a layer
// nothing needs is merged first when that makes room.
func TestMaxDepth(t *testing.T) {
	t.Parallel()
	w := newCoWorld(t, storage.PoolConfig{MaxDepth: 3})
	w.write(0x81, 0, 1)
	w.snap("s1", storage.DiskExternal)
	w.write(0x82, 1, 1)
	w.snap("s2", storage.DiskExternal)
	w.write(0x83, 2, 1)
	files := w.e.PoolFiles()
	_, err := w.e.M.CreateSnapshot(w.e.Ctx, "vm", storage.SnapshotSpec{Name: "s3",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}})
	var tooLong *storage.ChainTooLongError
	if !errors.As(err, &tooLong) || !errors.Is(err, errdefs.ErrOperationInvalid) || errdefs.CodeOf(err) != errdefs.CodeOperationInvalid {
		t.Fatalf("a fourth layer: %v, want ChainTooLongError (55)", err)
	}
	if tooLong.Depth != 4 || tooLong.Max != 3 || tooLong.Disk != "vda" || len(tooLong.Held) != 3 {
		t.Fatalf("error %+v", tooLong)
	}
	wantHeld := [][]string{{}, {"s2"}, {"s1"}}
	for i, h := range tooLong.Held {
		if !slices.Equal(h.Snapshots, wantHeld[i]) && !(len(h.Snapshots) == 0 && len(wantHeld[i]) == 0) {
			t.Fatalf("held %d: %+v, want snapshots %v", i, h, wantHeld[i])
		}
	}
	for _, want := range []string{"vm-vda.s2 (the active layer", "vm-vda.s1 (the state of snapshot s2)", "vm-vda.qcow2 (the state of snapshot s1)", "allows 3"} {
		if !strings.Contains(err.Error(), want) {
			t.Fatalf("error %q does not say %q", err, want)
		}
	}
	if !slices.Equal(w.e.PoolFiles(), files) {
		t.Fatalf("the refusal changed the pool: %v -> %v", files, w.e.PoolFiles())
	}
	// An internal snapshot adds no layer.
	w.snap("i1", storage.DiskInternal)
	// Deleting s1 merges its pair: room for s3.
	w.del("s1")
	w.write(0x84, 3, 1)
	if _, err := w.e.M.CreateSnapshot(w.e.Ctx, "vm", storage.SnapshotSpec{Name: "s3",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatal(err)
	}
	// A NO_METADATA layer under the chain is merged to make room.
	w.del("i1")
	w.del("s3")
	w.noMeta("b1")
	if c := w.e.Chain("vm", "vda"); len(c) != 3 {
		t.Fatalf("chain %v", c)
	}
	w.write(0x85, 4, 1)
	s4 := w.snap("s4", storage.DiskExternal)
	if c := w.e.Chain("vm", "vda"); len(c) != 3 {
		t.Fatalf("chain after s4 %v, want 3 layers: the NO_METADATA base merged first", c)
	}
	s, err := w.e.M.Snapshot(w.e.Ctx, "vm", "s4")
	if err != nil {
		t.Fatal(err)
	}
	expectView(t, s.Disks[0].Image, "", s4)
	w.e.CheckClean("vm")
}

// TestDeleteRemovesAbandonedChain: an abandoned overlay kept only for its
// internal snapshot, over a layer nothing needs either: deleting the
// internal snapshot removes both, the upper one first (the lower one was
// left behind as an orphan file, its overlay counting as its user).
func TestDeleteRemovesAbandonedChain(t *testing.T) {
	t.Parallel()
	w := newCoWorld(t, storage.PoolConfig{})
	w.write(0x91, 0, 1)
	s1 := w.snap("s1", storage.DiskExternal)
	w.write(0x92, 1, 1)
	w.snap("s2", storage.DiskExternal)
	w.write(0x93, 2, 1)
	w.snap("i1", storage.DiskInternal)
	if _, err := w.e.M.Revert(w.e.Ctx, "vm", "s1", storage.RevertOptions{}); err != nil {
		t.Fatal(err)
	}
	w.cur = s1
	if r := w.del("s2"); r.Disks[0].Action != storage.ActionInternalAbove {
		t.Fatalf("delete s2: %+v", r.Disks)
	}
	if got := w.e.PoolFiles(); !slices.Equal(got, []string{"vm-vda.qcow2", "vm-vda.s1", "vm-vda.s1-1", "vm-vda.s2"}) {
		t.Fatalf("pool %v", got)
	}
	r := w.del("i1")
	if !slices.Equal(r.Collected, []string{w.path("vm-vda.s2"), w.path("vm-vda.s1")}) {
		t.Fatalf("delete i1 collected %v, want vm-vda.s2 then vm-vda.s1", r.Collected)
	}
	if got := w.e.PoolFiles(); !slices.Equal(got, []string{"vm-vda.qcow2", "vm-vda.s1-1"}) {
		t.Fatalf("pool %v", got)
	}
	active, _ := w.e.Active("vm", "vda")
	expectView(t, active, "", s1)
	w.e.CheckClean("vm")
}

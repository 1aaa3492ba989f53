package storage_test

// Offline block commits and pulls on real images: each test asserts the
// exact chain afterwards (the records and qemu-img info --backing-chain),
// the data read back with qemu-io, qemu-img check, and what was removed
// or kept; each refusal asserts that nothing changed, byte for byte.

import (
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
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

const bjMiB = 1 << 20

func bjEnv(t *testing.T) *storagetest.Env {
	t.Helper()
	t.Parallel()
	storage.Register("dir", dir.New)
	return storagetest.NewEnv(t, "dir")
}

// bjLayer takes a snapshot that records nothing (libvirt's
// NO_METADATA): a new layer on every disk of vm, as a chain grows under
// libvirt's own users before a blockcommit.
func bjLayer(e *storagetest.Env, name string) {
	e.T.Helper()
	_, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: name, NoMetadata: true,
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}})
	if err != nil {
		e.T.Fatal(err)
	}
}

// bjChain builds vm-vda.qcow2 (0x11 at 0) <- .a (0x22 at 1 MiB) <- .b
// (0x33 at 2 MiB, and 0x34 over the first MiB's second half) <- ... for
// each name, and returns the pool's files.
func bjChain(e *storagetest.Env, names ...string) {
	e.T.Helper()
	e.NewDomain("vm", "vda", "vdb")
	e.Write("vm", "vda", 0x11, 0, bjMiB)
	e.Write("vm", "vdb", 0x51, 0, bjMiB)
	for i, n := range names {
		bjLayer(e, n)
		e.Write("vm", "vda", byte(0x22+0x11*i), (i+1)*bjMiB, bjMiB)
	}
}

// bjExpectData asserts what vda reads after bjChain(names...) and any
// number of commits and pulls: nothing of it may change.
func bjExpectData(e *storagetest.Env, layers int) {
	e.T.Helper()
	e.Expect("vm", "vda", 0x11, 0, bjMiB)
	for i := 0; i < layers; i++ {
		e.Expect("vm", "vda", byte(0x22+0x11*i), (i+1)*bjMiB, bjMiB)
	}
	e.Expect("vm", "vda", 0x00, (layers+1)*bjMiB, bjMiB)
	e.Expect("vm", "vdb", 0x51, 0, bjMiB)
}

// qemuChain is the chain qemu-img reads from path (-U: never locked out),
// as file names.
func qemuChain(t *testing.T, path string) []string {
	t.Helper()
	out := storagetest.Run(t, "qemu-img", "info", "-U", "--backing-chain", "--output=json", "-f", "qcow2", path)
	var infos []struct {
		Filename string `json:"filename"`
	}
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	var names []string
	for _, i := range infos {
		names = append(names, filepath.Base(i.Filename))
	}
	return names
}

// bjExpectChain asserts vda's chain in the records and as qemu-img reads
// it from the active layer.
func bjExpectChain(e *storagetest.Env, want ...string) {
	e.T.Helper()
	e.ExpectChain("vm", "vda", want...)
	active, _ := e.Active("vm", "vda")
	if got := qemuChain(e.T, active); !slices.Equal(got, want) {
		e.T.Fatalf("qemu-img reads the chain %v, want %v", got, want)
	}
}

// bjSnapshot runs qemu-img snapshot OP NAME on a qcow2 image, its format
// named (--image-opts: qemu-img snapshot has no -f).
func bjSnapshot(e *storagetest.Env, op, name, path string) {
	e.T.Helper()
	e.Run("qemu-img", "snapshot", "--image-opts", op, name, "driver=qcow2,file.filename="+path)
}

func bjExpectFiles(e *storagetest.Env, want ...string) {
	e.T.Helper()
	slices.Sort(want)
	if got := e.PoolFiles(); !slices.Equal(got, want) {
		e.T.Fatalf("pool files %v, want %v", got, want)
	}
}

// bjState is everything a refused job must leave as it was: every pool
// file's bytes, the domain record and the snapshot records.
func bjState(e *storagetest.Env) string {
	e.T.Helper()
	var b strings.Builder
	for _, f := range e.PoolFiles() {
		data, err := os.ReadFile(e.Path(f))
		if err != nil {
			e.T.Fatal(err)
		}
		fmt.Fprintf(&b, "%s %x\n", f, sha256.Sum256(data))
	}
	d, err := e.M.Domain(e.Ctx, "vm")
	if err != nil {
		e.T.Fatal(err)
	}
	rec, _ := json.Marshal(d)
	b.Write(rec)
	snaps, err := e.M.Snapshots(e.Ctx, "vm")
	if err != nil {
		e.T.Fatal(err)
	}
	for _, s := range snaps {
		full, err := e.M.Snapshot(e.Ctx, "vm", s.Name)
		if err != nil {
			e.T.Fatal(err)
		}
		rec, _ := json.Marshal(full)
		b.Write(rec)
	}
	return b.String()
}

// bjRefused runs a job that must be refused with a *ConflictError naming
// each of want, and asserts nothing changed.
func bjRefused(e *storagetest.Env, job func() error, want ...string) {
	e.T.Helper()
	before := bjState(e)
	err := job()
	e.T.Log(err)
	var ce *storage.ConflictError
	if !errors.As(err, &ce) || !errors.Is(err, errdefs.ErrOperationInvalid) || errdefs.CodeOf(err) != errdefs.CodeOperationInvalid {
		e.T.Fatalf("got %v, want a ConflictError (55)", err)
	}
	for _, w := range want {
		if !strings.Contains(err.Error(), w) {
			e.T.Fatalf("the refusal does not say %q: %v", w, err)
		}
	}
	if after := bjState(e); after != before {
		e.T.Fatalf("a refused job changed something:\nbefore %s\nafter %s", before, after)
	}
}

func TestBlockCommitActiveToBottom(t *testing.T) {
	e := bjEnv(t)
	bjChain(e, "a", "b")
	r, err := e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Active: true})
	if err != nil {
		t.Fatal(err)
	}
	if r.Top != e.Path("vm-vda.b") || r.Base != e.Path("vm-vda.qcow2") || r.Active != e.Path("vm-vda.qcow2") ||
		!slices.Equal(r.Removed, []string{e.Path("vm-vda.b"), e.Path("vm-vda.a")}) || len(r.Kept) != 0 {
		t.Fatalf("report %+v", r)
	}
	bjExpectChain(e, "vm-vda.qcow2")
	bjExpectData(e, 2)
	bjExpectFiles(e, "vm-vda.qcow2", "vm-vdb.qcow2")
	e.CheckNoFault("vm")
}

func TestBlockCommitActiveIntoMiddle(t *testing.T) {
	e := bjEnv(t)
	bjChain(e, "a", "b")
	// The disk named by its active image's path, as virsh allows.
	r, err := e.M.BlockCommit(e.Ctx, "vm", e.Path("vm-vda.b"), storage.BlockCommitOptions{Active: true, Base: e.Path("vm-vda.a")})
	if err != nil {
		t.Fatal(err)
	}
	if r.Disk != "vda" || !slices.Equal(r.Removed, []string{e.Path("vm-vda.b")}) {
		t.Fatalf("report %+v", r)
	}
	bjExpectChain(e, "vm-vda.a", "vm-vda.qcow2")
	bjExpectData(e, 2)
	// vm-vda.qcow2 took nothing.
	storagetest.ExpectImage(t, e.Path("vm-vda.qcow2"), "qcow2", 0x00, bjMiB, 2*bjMiB)
	bjExpectFiles(e, "vm-vda.a", "vm-vda.qcow2", "vm-vdb.qcow2")
	e.CheckNoFault("vm")
}

func TestBlockCommitShallow(t *testing.T) {
	e := bjEnv(t)
	bjChain(e, "a", "b")
	r, err := e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Top: e.Path("vm-vda.a"), Shallow: true})
	if err != nil {
		t.Fatal(err)
	}
	if r.Base != e.Path("vm-vda.qcow2") || r.Active != e.Path("vm-vda.b") {
		t.Fatalf("report %+v", r)
	}
	bjExpectChain(e, "vm-vda.b", "vm-vda.qcow2")
	bjExpectData(e, 2)
	bjExpectFiles(e, "vm-vda.b", "vm-vda.qcow2", "vm-vdb.qcow2")
	e.CheckNoFault("vm")
}

// TestBlockCommitDeep: a commit past images between Top and Base is one
// qemu-img commit -b; the image above Top is rebased onto Base.
func TestBlockCommitDeep(t *testing.T) {
	e := bjEnv(t)
	bjChain(e, "a", "b", "c")
	r, err := e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Top: "vm-vda.b", Base: e.Path("vm-vda.qcow2")})
	if err == nil {
		t.Fatalf("a relative top resolves against the working folder, not the pool: %+v", r)
	}
	r, err = e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Top: e.Path("vm-vda.b"), Base: e.Path("vm-vda.qcow2")})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.Removed, []string{e.Path("vm-vda.b"), e.Path("vm-vda.a")}) {
		t.Fatalf("report %+v", r)
	}
	bjExpectChain(e, "vm-vda.c", "vm-vda.qcow2")
	bjExpectData(e, 3)
	storagetest.ExpectImage(t, e.Path("vm-vda.qcow2"), "qcow2", 0x33, 2*bjMiB, bjMiB)
	e.CheckNoFault("vm")
}

// TestBlockCommitKeepsUserImages: images xlsnap did not create leave the
// chain but stay on disk, as libvirt leaves them.
func TestBlockCommitKeepsUserImages(t *testing.T) {
	e := bjEnv(t)
	base, mid, top := e.Path("base.qcow2"), e.Path("mid.qcow2"), e.Path("top.qcow2")
	e.Run("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, mid)
	e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", mid, top)
	e.Run("qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", mid)
	e.Run("qemu-io", "-f", "qcow2", "-c", "write -P 0x62 1M 1M", top)
	if _, err := e.M.DefineDomain(e.Ctx, "vm", "vm", "", []storage.DiskSpec{{Target: "vda", Path: top, Format: "qcow2"}}); err != nil {
		t.Fatal(err)
	}
	r, err := e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Active: true})
	if err != nil {
		t.Fatal(err)
	}
	if len(r.Removed) != 0 || !slices.Equal(r.Kept, []string{top, mid}) {
		t.Fatalf("report %+v", r)
	}
	bjExpectChain(e, "base.qcow2")
	e.Expect("vm", "vda", 0x61, 0, bjMiB)
	e.Expect("vm", "vda", 0x62, bjMiB, bjMiB)
	bjExpectFiles(e, "base.qcow2", "mid.qcow2", "top.qcow2")
}

func TestBlockPullWhole(t *testing.T) {
	e := bjEnv(t)
	bjChain(e, "a", "b")
	r, err := e.M.BlockPull(e.Ctx, "vm", "vda", storage.BlockPullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// vm-vda.qcow2 is the user's (the domain was defined on it): kept.
	if r.Base != "" || r.Active != e.Path("vm-vda.b") || !slices.Equal(r.Removed, []string{e.Path("vm-vda.a")}) ||
		!slices.Equal(r.Kept, []string{e.Path("vm-vda.qcow2")}) {
		t.Fatalf("report %+v", r)
	}
	bjExpectChain(e, "vm-vda.b")
	bjExpectData(e, 2)
	bjExpectFiles(e, "vm-vda.b", "vm-vda.qcow2", "vm-vdb.qcow2")
	e.CheckNoFault("vm")
}

func TestBlockPullPartial(t *testing.T) {
	e := bjEnv(t)
	bjChain(e, "a", "b", "c")
	r, err := e.M.BlockPull(e.Ctx, "vm", "vda", storage.BlockPullOptions{Base: e.Path("vm-vda.a")})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.Removed, []string{e.Path("vm-vda.b")}) {
		t.Fatalf("report %+v", r)
	}
	bjExpectChain(e, "vm-vda.c", "vm-vda.a", "vm-vda.qcow2")
	bjExpectData(e, 3)
	// From the image just below the active layer: nothing to do.
	before := bjState(e)
	r, err = e.M.BlockPull(e.Ctx, "vm", "vda", storage.BlockPullOptions{Base: e.Path("vm-vda.a")})
	if err != nil || !r.Unchanged {
		t.Fatalf("%+v, %v", r, err)
	}
	if bjState(e) != before {
		t.Fatal("a pull with nothing to do changed something")
	}
	e.CheckNoFault("vm")
}

// TestBlockPullKeepsSnapshotData: the images a pull takes out of the
// disk's chain stay while a snapshot reads them, and the snapshot still
// reads its data (a revert to it shows it).
func TestBlockPullKeepsSnapshotData(t *testing.T) {
	e := bjEnv(t)
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0x11, 0, bjMiB)
	if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "s1", DomainXML: "<domain/>",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatal(err)
	}
	e.Write("vm", "vda", 0x22, 0, bjMiB)
	bjLayer(e, "x")
	e.Write("vm", "vda", 0x33, bjMiB, bjMiB)
	r, err := e.M.BlockPull(e.Ctx, "vm", "vda", storage.BlockPullOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// vm-vda.s1 (s1's overlay, written after it) is needed by nothing;
	// vm-vda.qcow2 holds s1's state.
	if !slices.Equal(r.Removed, []string{e.Path("vm-vda.s1")}) || !slices.Equal(r.Kept, []string{e.Path("vm-vda.qcow2")}) {
		t.Fatalf("report %+v", r)
	}
	bjExpectChain(e, "vm-vda.x")
	e.Expect("vm", "vda", 0x22, 0, bjMiB)
	e.Expect("vm", "vda", 0x33, bjMiB, bjMiB)
	e.CheckNoFault("vm")
	if _, err := e.M.Revert(e.Ctx, "vm", "s1", storage.RevertOptions{}); err != nil {
		t.Fatal(err)
	}
	e.Expect("vm", "vda", 0x11, 0, bjMiB)
	e.Expect("vm", "vda", 0x00, bjMiB, bjMiB)
	e.CheckNoFault("vm")
}

func TestBlockCommitRefusals(t *testing.T) {
	commitActive := func(e *storagetest.Env) func() error {
		return func() error {
			_, err := e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Active: true})
			return err
		}
	}
	t.Run("base-is-snapshot-state", func(t *testing.T) {
		e := bjEnv(t)
		e.NewDomain("vm", "vda")
		e.Write("vm", "vda", 0x11, 0, bjMiB)
		if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "s1", DomainXML: "<domain/>",
			Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
			t.Fatal(err)
		}
		e.Write("vm", "vda", 0x22, 0, bjMiB)
		bjRefused(e, commitActive(e), e.Path("vm-vda.qcow2"), "snapshot s1")
	})
	t.Run("middle-is-snapshot-state", func(t *testing.T) {
		e := bjEnv(t)
		bjChain(e, "a")
		if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "s1", DomainXML: "<domain/>",
			Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
			t.Fatal(err)
		}
		// s1's state is vm-vda.a, which leaves the chain.
		bjRefused(e, commitActive(e), e.Path("vm-vda.a"), "snapshot s1")
		// So is a shallow one into s1's overlay, which s1 does not read;
		// above that it is fine, and s1 reads the same.
		bjRefused(e, func() error {
			_, err := e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Active: true, Shallow: true})
			return err
		}, e.Path("vm-vda.a"), "snapshot s1")
		e.Write("vm", "vda", 0x44, 3*bjMiB, bjMiB)
		bjLayer(e, "x")
		e.Write("vm", "vda", 0x45, 4*bjMiB, bjMiB)
		if _, err := e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Active: true, Shallow: true}); err != nil {
			t.Fatal(err)
		}
		bjExpectChain(e, "vm-vda.s1", "vm-vda.a", "vm-vda.qcow2")
		e.Expect("vm", "vda", 0x44, 3*bjMiB, bjMiB)
		e.Expect("vm", "vda", 0x45, 4*bjMiB, bjMiB)
		e.CheckNoFault("vm")
		if _, err := e.M.Revert(e.Ctx, "vm", "s1", storage.RevertOptions{}); err != nil {
			t.Fatal(err)
		}
		e.Expect("vm", "vda", 0x22, bjMiB, bjMiB)
		e.Expect("vm", "vda", 0x00, 3*bjMiB, 2*bjMiB)
	})
	t.Run("linked-clone", func(t *testing.T) {
		e := bjEnv(t)
		bjChain(e, "a")
		clone := e.Path("clone.qcow2")
		e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vda.qcow2"), clone)
		bjRefused(e, commitActive(e), e.Path("vm-vda.qcow2"), "overlay "+clone)
	})
	t.Run("other-domain", func(t *testing.T) {
		e := bjEnv(t)
		bjChain(e, "a")
		// Another domain's disk on an overlay of vm's middle layer.
		other := e.Path("other.qcow2")
		e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vda.a"), other)
		if _, err := e.M.DefineDomain(e.Ctx, "web", "web", "", []storage.DiskSpec{{Target: "xvda", Path: other, Format: "qcow2"}}); err != nil {
			t.Fatal(err)
		}
		bjRefused(e, commitActive(e), e.Path("vm-vda.a"), "disk xvda of domain web")
	})
	t.Run("other-disk", func(t *testing.T) {
		e := bjEnv(t)
		e.NewDomain("vm", "vda")
		bjLayer(e, "a")
		// vdb reads vda's base through an overlay of its own.
		vdb := e.Path("vm-vdb.qcow2")
		e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vda.qcow2"), vdb)
		if _, err := e.M.DefineDomain(e.Ctx, "vm", "vm", "", []storage.DiskSpec{
			{Target: "vda", Path: e.Path("vm-vda.a"), Format: "qcow2"}, {Target: "vdb", Path: vdb, Format: "qcow2"}}); err != nil {
			t.Fatal(err)
		}
		bjRefused(e, commitActive(e), e.Path("vm-vda.qcow2"))
	})
	t.Run("internal-snapshot-in-top", func(t *testing.T) {
		e := bjEnv(t)
		bjChain(e, "a")
		bjSnapshot(e, "-c", "keep", e.Path("vm-vda.a"))
		bjRefused(e, commitActive(e), e.Path("vm-vda.a"), "internal snapshot")
		bjRefused(e, func() error {
			_, err := e.M.BlockPull(e.Ctx, "vm", "vda", storage.BlockPullOptions{})
			return err
		}, e.Path("vm-vda.a"), "internal snapshot")
	})
	t.Run("pull-other-reader", func(t *testing.T) {
		e := bjEnv(t)
		bjChain(e, "a")
		if _, err := e.M.DefineDomain(e.Ctx, "web", "web", "", []storage.DiskSpec{{Target: "xvda", Path: e.Path("vm-vda.a"), Format: "qcow2"}}); err != nil {
			t.Fatal(err)
		}
		bjRefused(e, func() error {
			_, err := e.M.BlockPull(e.Ctx, "vm", "vda", storage.BlockPullOptions{})
			return err
		}, e.Path("vm-vda.a"), "domain web")
	})
}

// TestBlockCommitInternalSnapshots: an internal snapshot in Base, or in
// an image above Top, sees the same data after the commit; the commit
// goes ahead and the internal snapshot still reads its own.
func TestBlockCommitInternalSnapshots(t *testing.T) {
	e := bjEnv(t)
	bjChain(e, "a", "b")
	base, b := e.Path("vm-vda.qcow2"), e.Path("vm-vda.b")
	bjSnapshot(e, "-c", "inbase", base)
	bjSnapshot(e, "-c", "above", b)
	e.Write("vm", "vda", 0x77, 0, bjMiB)
	if _, err := e.M.BlockCommit(e.Ctx, "vm", "vda", storage.BlockCommitOptions{Top: e.Path("vm-vda.a")}); err != nil {
		t.Fatal(err)
	}
	bjExpectChain(e, "vm-vda.b", "vm-vda.qcow2")
	e.Expect("vm", "vda", 0x77, 0, bjMiB)
	e.Expect("vm", "vda", 0x22, bjMiB, bjMiB)
	// Each internal snapshot, applied to a copy, reads what it held.
	applied := func(img, name string) string {
		cp := filepath.Join(t.TempDir(), filepath.Base(img))
		storagetest.CopyFile(t, img, cp)
		bjSnapshot(e, "-a", name, cp)
		return cp
	}
	cp := applied(base, "inbase")
	storagetest.ExpectImage(t, cp, "qcow2", 0x11, 0, bjMiB)
	storagetest.ExpectImage(t, cp, "qcow2", 0x00, bjMiB, bjMiB)
	cp = applied(b, "above") // its backing reference is vm-vda.qcow2's absolute path
	storagetest.ExpectImage(t, cp, "qcow2", 0x11, 0, bjMiB)
	storagetest.ExpectImage(t, cp, "qcow2", 0x22, bjMiB, bjMiB)
	storagetest.ExpectImage(t, cp, "qcow2", 0x33, 2*bjMiB, bjMiB)
}

func TestBlockJobArguments(t *testing.T) {
	e := bjEnv(t)
	bjChain(e, "a", "b")
	before := bjState(e)
	for _, tc := range []struct {
		opts storage.BlockCommitOptions
		disk string
		want string
	}{
		{storage.BlockCommitOptions{}, "vda", "commit of 'vda' active layer requires active flag"},
		{storage.BlockCommitOptions{Active: true, Top: e.Path("vm-vda.a")}, "vda", "active commit requested but '" + e.Path("vm-vda.a") + "' is not active"},
		{storage.BlockCommitOptions{Top: e.Path("vm-vda.qcow2")}, "vda", "top '" + e.Path("vm-vda.qcow2") + "' in chain for 'vda' has no backing file"},
		{storage.BlockCommitOptions{Top: e.Path("nosuch")}, "vda", "could not find image '" + e.Path("nosuch") + "' in chain for 'vda'"},
		{storage.BlockCommitOptions{Top: e.Path("vm-vda.a"), Base: e.Path("vm-vda.b")}, "vda", "could not find image '" + e.Path("vm-vda.b") + "' beneath '" + e.Path("vm-vda.a") + "' in chain for 'vda'"},
		{storage.BlockCommitOptions{Active: true, Shallow: true, Base: e.Path("vm-vda.qcow2")}, "vda", "base '" + e.Path("vm-vda.qcow2") + "' is not immediately below '" + e.Path("vm-vda.b") + "' in chain for 'vda'"},
		{storage.BlockCommitOptions{Active: true}, "vdz", "disk 'vdz' not found in domain"},
	} {
		_, err := e.M.BlockCommit(e.Ctx, "vm", tc.disk, tc.opts)
		if !errors.Is(err, errdefs.ErrInvalidArg) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: got %v, want %q (8)", tc.opts, err, tc.want)
		}
	}
	if _, err := e.M.BlockPull(e.Ctx, "vm", "vda", storage.BlockPullOptions{Base: e.Path("vm-vda.b")}); !errors.Is(err, errdefs.ErrInvalidArg) {
		t.Errorf("a pull from the active layer itself: %v", err)
	}
	if bjState(e) != before {
		t.Fatal("a refused call changed something")
	}
}

package storagetest

import (
	"errors"
	"slices"
	"testing"

	"github.com/xlsnap/xlsnap/storage"
)

const mib = 1 << 20

// Suite runs every conformance test against the backend type typ, which
// the caller has registered with storage.Register.
func Suite(t *testing.T, typ string) {
	tests := []struct {
		name string
		fn   func(t *testing.T, e *Env)
	}{
		{"ExternalSnapshotRevert", testExternalSnapshotRevert},
		{"InternalSnapshotRevert", testInternalSnapshotRevert},
		{"MixedTree", testMixedTree},
		{"DeleteLeafExternal", testDeleteLeafExternal},
		{"DeleteNonLeafPullsUp", testDeleteNonLeafPullsUp},
		{"DeleteNonLeafCommitsDown", testDeleteNonLeafCommitsDown},
		{"DeleteSharedBaseAfterRevert", testDeleteSharedBase},
		{"DeleteChildren", testDeleteChildren},
		{"DeleteChildrenOnly", testDeleteChildrenOnly},
		{"DeleteMetadataOnly", testDeleteMetadataOnly},
		{"InternalSnapshotBlocksMerge", testInternalBlocksMerge},
		{"InternalRevertUnderExternal", testInternalRevertUnderExternal},
		{"NoMetadata", testNoMetadata},
		{"ReuseExternal", testReuseExternal},
		{"BadInput", testBadInput},
		{"Events", testEvents},
		{"ChainChangedRescan", testChainChanged},
		{"CheckRepairOrphans", testCheckRepair},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t, NewEnv(t, typ))
		})
	}
}

func external(disks ...string) []storage.SnapshotDiskSpec {
	var out []storage.SnapshotDiskSpec
	for _, d := range disks {
		out = append(out, storage.SnapshotDiskSpec{Target: d, Mode: storage.DiskExternal})
	}
	return out
}

func internal(disks ...string) []storage.SnapshotDiskSpec {
	var out []storage.SnapshotDiskSpec
	for _, d := range disks {
		out = append(out, storage.SnapshotDiskSpec{Target: d, Mode: storage.DiskInternal})
	}
	return out
}

func (e *Env) snapshot(domain, name string, disks []storage.SnapshotDiskSpec) *storage.Snapshot {
	e.T.Helper()
	s, err := e.M.CreateSnapshot(e.Ctx, domain, storage.SnapshotSpec{Name: name, Disks: disks, DomainXML: "<domain/>"})
	if err != nil {
		e.T.Fatalf("CreateSnapshot %s: %v", name, err)
	}
	return s
}

func (e *Env) revert(domain, name string) {
	e.T.Helper()
	if _, err := e.M.Revert(e.Ctx, domain, name, storage.RevertOptions{}); err != nil {
		e.T.Fatalf("Revert %s: %v", name, err)
	}
}

func (e *Env) del(domain, name string, opts storage.DeleteOptions) *storage.DeleteReport {
	e.T.Helper()
	r, err := e.M.DeleteSnapshot(e.Ctx, domain, name, opts)
	if err != nil {
		e.T.Fatalf("DeleteSnapshot %s: %v", name, err)
	}
	return r
}

func (e *Env) expectSnapshots(domain string, want ...string) {
	e.T.Helper()
	list, err := e.M.Snapshots(e.Ctx, domain)
	if err != nil {
		e.T.Fatal(err)
	}
	var got []string
	for _, s := range list {
		got = append(got, s.Name)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		e.T.Fatalf("snapshots %v, want %v", got, want)
	}
}

// testExternalSnapshotRevert: each snapshot shows exactly the data of its
// time, on both disks, after reverts back and forth.
func testExternalSnapshotRevert(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda", "vdb")
	e.Write("vm", "vda", 0x11, 0, mib)
	e.Write("vm", "vdb", 0x21, 0, mib)
	s1 := e.snapshot("vm", "s1", external("vda", "vdb"))
	if s1.Parent != "" || s1.Disks[0].Image != e.Path("vm-vda.qcow2") || s1.Disks[0].Overlay != e.Path("vm-vda.s1") {
		t.Fatalf("s1 %+v", s1)
	}
	e.ExpectChain("vm", "vda", "vm-vda.s1", "vm-vda.qcow2")
	e.Write("vm", "vda", 0x12, 0, mib)
	e.Write("vm", "vdb", 0x22, mib, mib)
	s2 := e.snapshot("vm", "s2", external("vda", "vdb"))
	if s2.Parent != "s1" {
		t.Fatalf("s2 parent %q", s2.Parent)
	}
	e.Write("vm", "vda", 0x13, 0, mib)

	e.revert("vm", "s1")
	e.Expect("vm", "vda", 0x11, 0, mib)
	e.Expect("vm", "vdb", 0x21, 0, mib)
	e.Expect("vm", "vdb", 0x00, mib, mib)
	e.ExpectChain("vm", "vda", "vm-vda.s1-1", "vm-vda.qcow2")

	e.revert("vm", "s2")
	e.Expect("vm", "vda", 0x12, 0, mib)
	e.Expect("vm", "vdb", 0x22, mib, mib)
	// The layers that held 0x13 and then s1's branch were abandoned and
	// nothing needed them: the revert's new overlay reuses the free name.
	e.ExpectChain("vm", "vda", "vm-vda.s2", "vm-vda.s1", "vm-vda.qcow2")
	want := []string{"vm-vda.qcow2", "vm-vda.s1", "vm-vda.s2", "vm-vdb.qcow2", "vm-vdb.s1", "vm-vdb.s2"}
	if files := e.PoolFiles(); !slices.Equal(files, want) {
		t.Fatalf("pool %v, want %v", files, want)
	}
	cur, err := e.M.Domain(e.Ctx, "vm")
	if err != nil || cur.Current != "s2" {
		t.Fatalf("current %q, %v", cur.Current, err)
	}
	e.CheckClean("vm")
}

func testInternalSnapshotRevert(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0x31, 0, mib)
	e.snapshot("vm", "i1", internal("vda"))
	e.Write("vm", "vda", 0x32, 0, mib)
	e.snapshot("vm", "i2", internal("vda"))
	e.Write("vm", "vda", 0x33, 0, mib)
	e.revert("vm", "i1")
	e.Expect("vm", "vda", 0x31, 0, mib)
	e.revert("vm", "i2")
	e.Expect("vm", "vda", 0x32, 0, mib)
	e.ExpectChain("vm", "vda", "vm-vda.qcow2")
	e.del("vm", "i1", storage.DeleteOptions{})
	e.Expect("vm", "vda", 0x32, 0, mib)
	e.revert("vm", "i2")
	e.Expect("vm", "vda", 0x32, 0, mib)
	e.expectSnapshots("vm", "i2")
	e.CheckClean("vm")
}

// testMixedTree: internal snapshots inside an external overlay, reverts
// across both kinds, a branch.
func testMixedTree(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda", "vdb")
	e.Write("vm", "vda", 0x41, 0, mib)
	e.Write("vm", "vdb", 0x51, 0, mib)
	e.snapshot("vm", "ext1", external("vda", "vdb"))
	e.Write("vm", "vda", 0x42, 0, mib)
	// One snapshot, one disk internal (in the overlay), the other external.
	e.snapshot("vm", "mix", []storage.SnapshotDiskSpec{
		{Target: "vda", Mode: storage.DiskInternal},
		{Target: "vdb", Mode: storage.DiskExternal},
	})
	e.Write("vm", "vda", 0x43, 0, mib)
	e.Write("vm", "vdb", 0x53, 0, mib)
	e.revert("vm", "mix")
	e.Expect("vm", "vda", 0x42, 0, mib)
	e.Expect("vm", "vdb", 0x51, 0, mib)
	e.revert("vm", "ext1")
	e.Expect("vm", "vda", 0x41, 0, mib)
	e.Expect("vm", "vdb", 0x51, 0, mib)
	// Branch: a new snapshot after reverting to ext1 is its child.
	e.Write("vm", "vda", 0x44, 0, mib)
	b := e.snapshot("vm", "branch", external("vda", "vdb"))
	if b.Parent != "ext1" {
		t.Fatalf("branch parent %q", b.Parent)
	}
	e.revert("vm", "mix")
	e.Expect("vm", "vda", 0x42, 0, mib)
	e.revert("vm", "branch")
	e.Expect("vm", "vda", 0x44, 0, mib)
	e.CheckClean("vm")
}

func testDeleteLeafExternal(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0x61, 0, mib)
	e.snapshot("vm", "s1", external("vda"))
	e.Write("vm", "vda", 0x62, mib, mib)
	r := e.del("vm", "s1", storage.DeleteOptions{})
	if len(r.Disks) != 1 || (r.Disks[0].Action != storage.ActionPulledUp && r.Disks[0].Action != storage.ActionMergedDown) {
		t.Fatalf("report %+v", r)
	}
	e.Expect("vm", "vda", 0x61, 0, mib)
	e.Expect("vm", "vda", 0x62, mib, mib)
	if n := len(e.Chain("vm", "vda")); n != 1 {
		t.Fatalf("chain after merge: %v", e.Chain("vm", "vda"))
	}
	if files := e.PoolFiles(); len(files) != 1 {
		t.Fatalf("pool after merge: %v", files)
	}
	e.expectSnapshots("vm")
	e.CheckClean("vm")
}

// testDeleteNonLeafCommitsDown: the state image holds more data than its
// child, so the child is committed into it; the later snapshot still shows
// its data.
func testDeleteNonLeafCommitsDown(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0x71, 0, 4*mib)
	e.snapshot("vm", "s1", external("vda"))
	e.Write("vm", "vda", 0x72, 0, mib)
	e.snapshot("vm", "s2", external("vda"))
	e.Write("vm", "vda", 0x73, 2*mib, mib)
	r := e.del("vm", "s1", storage.DeleteOptions{})
	if r.Disks[0].Action != storage.ActionMergedDown || r.Disks[0].Removed != e.Path("vm-vda.s1") {
		t.Fatalf("report %+v", r.Disks)
	}
	e.ExpectChain("vm", "vda", "vm-vda.s2", "vm-vda.qcow2")
	e.Expect("vm", "vda", 0x72, 0, mib)
	e.Expect("vm", "vda", 0x71, mib, mib)
	e.Expect("vm", "vda", 0x73, 2*mib, mib)
	e.revert("vm", "s2")
	e.Expect("vm", "vda", 0x72, 0, mib)
	e.Expect("vm", "vda", 0x71, mib, 3*mib)
	s2, err := e.M.Snapshot(e.Ctx, "vm", "s2")
	if err != nil || s2.Parent != "" || s2.DomainXML != "<domain/>" {
		t.Fatalf("s2 after its parent's delete: %+v, %v", s2, err)
	}
	e.CheckClean("vm")
}

// testDeleteNonLeafPullsUp: the child holds more, so it pulls the state
// image up into itself.
func testDeleteNonLeafPullsUp(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0x81, 0, mib)
	e.snapshot("vm", "s1", external("vda"))
	e.Write("vm", "vda", 0x82, mib, 4*mib)
	e.snapshot("vm", "s2", external("vda"))
	e.Write("vm", "vda", 0x83, 0, mib)
	r := e.del("vm", "s1", storage.DeleteOptions{})
	// vm-vda.qcow2 is the user's: the pulled-up image takes its name.
	if r.Disks[0].Action != storage.ActionPulledUp || r.Disks[0].Kept != e.Path("vm-vda.qcow2") || r.Disks[0].Removed != e.Path("vm-vda.s1") {
		t.Fatalf("report %+v", r.Disks)
	}
	e.ExpectChain("vm", "vda", "vm-vda.s2", "vm-vda.qcow2")
	e.Expect("vm", "vda", 0x83, 0, mib)
	e.Expect("vm", "vda", 0x82, mib, 4*mib)
	e.revert("vm", "s2")
	e.Expect("vm", "vda", 0x81, 0, mib)
	e.Expect("vm", "vda", 0x82, mib, 4*mib)
	e.CheckClean("vm")
}

// testDeleteSharedBase: after a revert the state image backs two images;
// deleting its snapshot keeps it, reported.
func testDeleteSharedBase(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0x91, 0, mib)
	e.snapshot("vm", "s1", external("vda"))
	e.Write("vm", "vda", 0x92, 0, mib)
	e.snapshot("vm", "s2", external("vda"))
	e.revert("vm", "s1")
	e.Write("vm", "vda", 0x93, 0, mib)
	r := e.del("vm", "s1", storage.DeleteOptions{})
	if r.Disks[0].Action != storage.ActionSharedBase || r.Disks[0].Kept != e.Path("vm-vda.qcow2") {
		t.Fatalf("report %+v", r.Disks)
	}
	e.Expect("vm", "vda", 0x93, 0, mib)
	e.revert("vm", "s2")
	e.Expect("vm", "vda", 0x92, 0, mib)
	// Now the base has one child again: deleting s2 merges.
	e.del("vm", "s2", storage.DeleteOptions{})
	e.Expect("vm", "vda", 0x92, 0, mib)
	e.expectSnapshots("vm")
	e.CheckClean("vm")
}

func (e *Env) chainOfThree() {
	e.NewDomain("vm", "vda")
	for i, n := range []string{"a", "b", "c"} {
		e.Write("vm", "vda", byte(0xa1+i), i*mib, mib)
		e.snapshot("vm", n, external("vda"))
	}
	e.Write("vm", "vda", 0xa4, 3*mib, mib)
}

func (e *Env) expectABC() {
	e.T.Helper()
	for i := range 4 {
		e.Expect("vm", "vda", byte(0xa1+i), i*mib, mib)
	}
}

func testDeleteChildren(t *testing.T, e *Env) {
	e.chainOfThree()
	r := e.del("vm", "b", storage.DeleteOptions{Children: true})
	if !slices.Equal(r.Deleted, []string{"c", "b"}) {
		t.Fatalf("deleted %v", r.Deleted)
	}
	e.expectSnapshots("vm", "a")
	e.expectABC()
	e.revert("vm", "a")
	e.Expect("vm", "vda", 0xa1, 0, mib)
	e.Expect("vm", "vda", 0x00, mib, mib)
	e.CheckClean("vm")
}

func testDeleteChildrenOnly(t *testing.T, e *Env) {
	e.chainOfThree()
	r := e.del("vm", "a", storage.DeleteOptions{ChildrenOnly: true})
	if !slices.Equal(r.Deleted, []string{"c", "b"}) {
		t.Fatalf("deleted %v", r.Deleted)
	}
	e.expectSnapshots("vm", "a")
	e.expectABC()
	d, _ := e.M.Domain(e.Ctx, "vm")
	if d.Current != "a" {
		t.Fatalf("current %q", d.Current)
	}
	e.CheckClean("vm")
}

func testDeleteMetadataOnly(t *testing.T, e *Env) {
	e.chainOfThree()
	before := e.Chain("vm", "vda")
	files := e.PoolFiles()
	e.del("vm", "b", storage.DeleteOptions{MetadataOnly: true})
	e.expectSnapshots("vm", "a", "c")
	if !slices.Equal(e.Chain("vm", "vda"), before) || !slices.Equal(e.PoolFiles(), files) {
		t.Fatalf("metadata-only delete changed disks: %v -> %v", files, e.PoolFiles())
	}
	c, _ := e.M.Snapshot(e.Ctx, "vm", "c")
	if c.Parent != "a" {
		t.Fatalf("c's parent %q", c.Parent)
	}
	e.expectABC()
}

// testInternalBlocksMerge: an internal snapshot in the child sees through
// to the state image, so deleting the external snapshot keeps both.
func testInternalBlocksMerge(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0xb1, 0, mib)
	e.snapshot("vm", "ext", external("vda"))
	e.Write("vm", "vda", 0xb2, mib, mib)
	e.snapshot("vm", "int", internal("vda"))
	e.Write("vm", "vda", 0xb3, 0, mib)
	r := e.del("vm", "ext", storage.DeleteOptions{})
	if r.Disks[0].Action != storage.ActionInternalAbove {
		t.Fatalf("report %+v", r.Disks)
	}
	e.ExpectChain("vm", "vda", "vm-vda.ext", "vm-vda.qcow2")
	e.revert("vm", "int")
	e.Expect("vm", "vda", 0xb1, 0, mib)
	e.Expect("vm", "vda", 0xb2, mib, mib)
	e.CheckClean("vm")
}

// testInternalRevertUnderExternal: an internal snapshot in an image that
// now backs external snapshots' overlays is reverted to by copying its
// content into a new image; the later snapshots keep their data.
func testInternalRevertUnderExternal(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0xe1, 0, mib)
	e.snapshot("vm", "int", internal("vda"))
	e.Write("vm", "vda", 0xe2, 0, mib)
	e.snapshot("vm", "ext", external("vda"))
	e.Write("vm", "vda", 0xe3, 0, mib)
	e.revert("vm", "int")
	e.Expect("vm", "vda", 0xe1, 0, mib)
	e.ExpectChain("vm", "vda", "vm-vda.int")
	e.Write("vm", "vda", 0xe4, mib, mib)
	e.revert("vm", "ext")
	e.Expect("vm", "vda", 0xe2, 0, mib)
	e.Expect("vm", "vda", 0x00, mib, mib)
	e.revert("vm", "int")
	e.Expect("vm", "vda", 0xe1, 0, mib)
	e.Expect("vm", "vda", 0x00, mib, mib)
	e.CheckClean("vm")
}

func testNoMetadata(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0xc1, 0, mib)
	_, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "ghost", Disks: external("vda"), NoMetadata: true})
	if err != nil {
		t.Fatal(err)
	}
	e.expectSnapshots("vm")
	e.ExpectChain("vm", "vda", "vm-vda.ghost", "vm-vda.qcow2")
	e.Expect("vm", "vda", 0xc1, 0, mib)
	// No snapshot needs the base under the overlay: check says the chain
	// could be shorter, and only Coalesce merges it.
	problems, err := e.M.Check(e.Ctx)
	if err != nil || len(problems) != 1 || problems[0].Kind != storage.ProblemCoalescible {
		t.Fatalf("Check: %+v, %v; want one coalescible", problems, err)
	}
	if _, err := e.M.Coalesce(e.Ctx, "vm", storage.CoalesceOptions{}); err != nil {
		t.Fatal(err)
	}
	if c := e.Chain("vm", "vda"); len(c) != 1 {
		t.Fatalf("chain after coalescing: %v", c)
	}
	e.Expect("vm", "vda", 0xc1, 0, mib)
	e.CheckClean("vm")
}

func testReuseExternal(t *testing.T, e *Env) {
	e.NewDomain("vm", "vda")
	e.Write("vm", "vda", 0xd1, 0, mib)
	pre := e.Path("prepared.qcow2")
	e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", e.Path("vm-vda.qcow2"), pre)
	e.snapshot("vm", "r", []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal, Overlay: pre, Reuse: true}})
	e.ExpectChain("vm", "vda", "prepared.qcow2", "vm-vda.qcow2")
	e.Expect("vm", "vda", 0xd1, 0, mib)
	// Reusing an overlay of some other image is refused.
	other := e.Path("other.qcow2")
	e.Run("qemu-img", "create", "-q", "-f", "qcow2", other, "16M")
	_, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: "bad",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal, Overlay: other, Reuse: true}}})
	if !errors.Is(err, storage.ErrInvalidArg) {
		t.Fatalf("reuse of an unrelated image: %v", err)
	}
	e.CheckClean("vm")
}

package integration

import (
	"slices"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// TestDeleteAfterRevertToNonLeaf: after reverting to a non-leaf external
// snapshot (libvirt refuses any delete then), deleting the parent first
// keeps its state image as a shared base, and deleting the child after
// collects the image nothing needs any more; the shared base, left with
// one child and no snapshot, is merged with it by the same delete.
func TestDeleteAfterRevertToNonLeaf(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.revertedToNonLeaf()
		e.expectChain("vda", "vda.s1-1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s1-1", "vdb.qcow2")

		rep := e.del("s1", 0)
		for _, disk := range e.disks {
			if a := action(rep, "s1", disk); a != driver.ActionSharedBase {
				t.Fatalf("delete s1, %s: %q, want %q (%+v)", disk, a, driver.ActionSharedBase, rep)
			}
		}
		e.expectParent("s2", "")
		e.expectCurrent("")
		e.expectChain("vda", "vda.s1-1", "vda.qcow2")

		rep = e.del("s2", 0)
		if !slices.Contains(rep.Collected, e.path("vda.s1")) || !slices.Contains(rep.Collected, e.path("vdb.s1")) {
			t.Fatalf("delete s2 collected %v, want vda.s1 and vdb.s1", rep.Collected)
		}
		if len(rep.Coalesced) != 2 || rep.Coalesced[0].Layer != e.path("vda.qcow2") || rep.Coalesced[1].Layer != e.path("vdb.qcow2") {
			t.Fatalf("delete s2 merged %+v, want vda.qcow2 and vdb.qcow2 with their one child", rep.Coalesced)
		}
		e.expectChain("vda", "vda.qcow2")
		e.expectChain("vdb", "vdb.qcow2")
		e.expectList(0)
		e.expectPool("vda.qcow2", "vdb.qcow2")
		e.finish()
	})
}

// TestDeleteAfterRevertChildFirst: the same tree, the child deleted first,
// then the parent whose state image now has one child: they merge, and
// the chain collapses to one image holding everything.
func TestDeleteAfterRevertChildFirst(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.revertedToNonLeaf()
		e.del("s2", 0)
		e.expectChain("vda", "vda.s1-1", "vda.qcow2")
		e.expectCurrent("s1")
		rep := e.del("s1", 0)
		for _, disk := range e.disks {
			if a := action(rep, "s1", disk); a != driver.ActionPulledUp && a != driver.ActionMergedDown {
				t.Fatalf("delete s1, %s: %q, want a merge (%+v)", disk, a, rep)
			}
		}
		for _, disk := range e.disks {
			if c := e.chainOf(disk); len(c) != 1 {
				t.Fatalf("%s's chain after the last delete: %v, want one image", disk, c)
			}
			e.expectChain(disk, e.chainOf(disk)...)
		}
		e.expectCurrent("")
		e.finish()
	})
}

// TestDeleteChildrenExternal: CHILDREN_ONLY and CHILDREN on a branched
// tree of external snapshots (libvirt refuses both for external ones).
func TestDeleteChildrenExternal(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		// s1 ─┬─ s2 ── s3
		//     └─ s4
		e.write(0)
		e.snap("s1", driver.CreateDiskOnly)
		e.write(1)
		e.snap("s2", driver.CreateDiskOnly)
		e.write(2)
		e.snap("s3", driver.CreateDiskOnly)
		e.write(3)
		e.revert("s1", 0)
		e.write(1)
		e.snap("s4", driver.CreateDiskOnly)
		e.expectChain("vda", "vda.s4", "vda.s1-1", "vda.qcow2")
		e.write(2)
		e.expectParent("s4", "s1")
		if n, err := e.d.SnapshotNumChildren(e.ctx, e.dom, "s1", 0); err != nil || n != 2 {
			t.Fatalf("NumChildren(s1) = %d, %v; want 2", n, err)
		}

		rep := e.del("s1", driver.DeleteChildrenOnly)
		got := slices.Clone(rep.Deleted)
		slices.Sort(got)
		if !slices.Equal(got, []string{"s2", "s3", "s4"}) {
			t.Fatalf("CHILDREN_ONLY deleted %v, want s2 s3 s4", rep.Deleted)
		}
		if i2, i3 := slices.Index(rep.Deleted, "s2"), slices.Index(rep.Deleted, "s3"); i3 > i2 {
			t.Fatalf("CHILDREN_ONLY deleted %v: s3 after its parent s2", rep.Deleted)
		}
		e.expectList(0, "s1")
		e.expectCurrent("s1")
		for _, disk := range e.disks {
			if c := e.chainOf(disk); len(c) != 2 || c[1] != disk+".qcow2" {
				t.Fatalf("%s after CHILDREN_ONLY: chain %v, want one overlay on %s.qcow2", disk, c, disk)
			}
		}
		e.revert("s1", 0)
		e.write(3)
		e.snap("s5", driver.CreateDiskOnly)
		e.write(0)
		e.snap("s6", driver.CreateDiskOnly)
		e.write(1)

		rep = e.del("s1", driver.DeleteChildren)
		if !slices.Equal(rep.Deleted, []string{"s6", "s5", "s1"}) {
			t.Fatalf("CHILDREN deleted %v, want s6 s5 s1 (leaves first)", rep.Deleted)
		}
		e.expectList(0)
		e.expectCurrent("")
		for _, disk := range e.disks {
			c := e.chainOf(disk)
			if len(c) != 1 {
				t.Fatalf("%s after deleting every snapshot: chain %v, want one image", disk, c)
			}
			e.expectChain(disk, c...)
		}
		e.finish()
	})
}

// TestDeleteMetadataOnly: METADATA_ONLY forgets the records and leaves
// every image and internal snapshot as it is.
func TestDeleteMetadataOnly(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", driver.CreateDiskOnly)
		e.write(1)
		e.snap("s2", 0) // internal, in vda.s1 and vdb.s1
		e.write(2)
		before := e.poolFiles()

		rep := e.del("s2", driver.DeleteMetadataOnly)
		for _, disk := range e.disks {
			if a := action(rep, "s2", disk); a != driver.ActionMetadataOnly {
				t.Fatalf("delete s2 --metadata, %s: %q", disk, a)
			}
		}
		e.expectInternalSnapshots("vda.s1", "s2")
		e.expectInternalSnapshots("vdb.s1", "s2")
		_, err := e.d.SnapshotLookupByName(e.ctx, e.dom, "s2", 0)
		expectErr(t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)
		e.expectCurrent("s1")

		e.del("s1", driver.DeleteMetadataOnly|driver.DeleteChildren)
		e.expectList(0)
		e.expectCurrent("")
		e.expectChain("vda", "vda.s1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s1", "vdb.qcow2")
		if after := e.poolFiles(); !slices.Equal(before, after) {
			t.Fatalf("METADATA_ONLY changed the pool: %v → %v", before, after)
		}
		e.finish()
	})
}

// TestDeleteMergeDirections: a delete merges in the cheaper direction by
// allocated bytes — committing a small overlay down into a big state
// image (its children rebased onto the state image, the snapshots that
// named the overlay repointed), or pulling a small state image up into a
// big child — and every snapshot keeps its data either way.
func TestDeleteMergeDirections(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.write(1)
		e.write(2)
		e.snap("s1", driver.CreateDiskOnly)
		e.write(3)
		e.snap("s2", driver.CreateDiskOnly)
		e.write(0)
		e.snap("s3", driver.CreateDiskOnly)
		e.expectChain("vda", "vda.s3", "vda.s2", "vda.s1", "vda.qcow2")

		// vda.s1 (64 KiB) into vda.qcow2 (192 KiB).
		rep := e.del("s1", 0)
		for _, disk := range e.disks {
			if a := action(rep, "s1", disk); a != driver.ActionMergedDown {
				t.Fatalf("delete s1, %s: %q, want %q (%+v)", disk, a, driver.ActionMergedDown, rep)
			}
		}
		e.expectChain("vda", "vda.s3", "vda.s2", "vda.qcow2")
		e.expectChain("vdb", "vdb.s3", "vdb.s2", "vdb.qcow2")
		if s2, _ := e.d.SnapshotLookupByName(e.ctx, e.dom, "s2", 0); s2.Disk("vda").Image != e.path("vda.qcow2") {
			t.Fatalf("s2's state image after the merge: %+v", s2.Disk("vda"))
		}

		// vda.s2 (64 KiB) up into the active vda.s3 (256 KiB).
		for r := range nRegions {
			e.write(r)
		}
		rep = e.del("s3", 0)
		for _, disk := range e.disks {
			if a := action(rep, "s3", disk); a != driver.ActionPulledUp {
				t.Fatalf("delete s3, %s: %q, want %q (%+v)", disk, a, driver.ActionPulledUp, rep)
			}
		}
		e.expectChain("vda", "vda.s3", "vda.qcow2")
		e.expectChain("vdb", "vdb.s3", "vdb.qcow2")
		e.revert("s2", 0)
		e.expectChain("vda", "vda.s2", "vda.qcow2")
		e.finish()
	})
}

// TestDeleteMergeKeepsInternal: a state image holding an internal
// snapshot is never pulled up (that would lose the internal snapshot):
// the child is committed down even when it is the bigger one, and the
// internal snapshot still holds its data.
func TestDeleteMergeKeepsInternal(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", 0) // internal, in vda.qcow2
		e.write(1)
		e.snap("s2", driver.CreateDiskOnly)
		for r := range nRegions {
			e.write(r)
		}
		rep := e.del("s2", 0)
		for _, disk := range e.disks {
			if a := action(rep, "s2", disk); a != driver.ActionMergedDown {
				t.Fatalf("delete s2, %s: %q, want %q (%+v)", disk, a, driver.ActionMergedDown, rep)
			}
		}
		e.expectChain("vda", "vda.qcow2")
		e.expectInternalSnapshots("vda.qcow2", "s1")
		e.revert("s1", 0)
		e.expectChain("vda", "vda.qcow2")
		e.finish()
	})
}

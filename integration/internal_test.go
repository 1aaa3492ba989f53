package integration

import (
	"slices"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// TestInternalDefault: without DISK_ONLY every disk takes an internal
// snapshot (libvirt's default); HALT is a no-op on a shut-off domain;
// reverts apply them; deleting a non-leaf one and CHILDREN remove them
// from the qcow2 images without touching the chain.
func TestInternalDefault(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		s1 := e.snap("s1", 0)
		for _, sd := range s1.Disks {
			if sd.Mode != driver.DiskInternal || sd.Image != e.path(sd.Target+".qcow2") {
				t.Fatalf("s1 disk %+v: want internal in %s.qcow2", sd, sd.Target)
			}
		}
		e.expectChain("vda", "vda.qcow2")
		e.expectChain("vdb", "vdb.qcow2")
		e.expectInternalSnapshots("vda.qcow2", "s1")
		e.expectInternalSnapshots("vdb.qcow2", "s1")
		// qemu-img looks snapshots up by id before name: a name that is
		// another internal snapshot's id ("1" is s1's) is refused.
		_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML("1"), 0)
		expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
		e.expectInternalSnapshots("vda.qcow2", "s1")
		e.expectInternalSnapshots("vdb.qcow2", "s1")
		e.write(1)
		e.snap("s2", driver.CreateHalt)
		e.write(2)
		e.snap("s3", 0)
		e.write(3)
		e.verify()
		e.expectSet(driver.ListInternal, "s1", "s2", "s3")
		e.expectSet(driver.ListExternal)

		e.revert("s1", 0)
		e.expectChain("vda", "vda.qcow2")
		e.write(3)
		e.revert("s2", 0)
		e.write(0)

		// s2 has a child (s3): libvirt deletes non-leaf internal ones too.
		rep := e.del("s2", 0)
		if a := action(rep, "s2", "vda"); a != driver.ActionInternalDeleted {
			t.Fatalf("delete s2: vda %q (%+v)", a, rep)
		}
		e.expectInternalSnapshots("vda.qcow2", "s1", "s3")
		e.expectParent("s3", "s1")
		e.expectCurrent("s1")
		e.revert("s3", 0)

		e.del("s1", driver.DeleteChildren)
		e.expectInternalSnapshots("vda.qcow2")
		e.expectInternalSnapshots("vdb.qcow2")
		e.expectChain("vda", "vda.qcow2")
		e.expectList(0)
		e.finish()
	})
}

// TestMixedTree: internal and external snapshots in one tree (an internal
// snapshot inside an external snapshot's overlay), which libvirt refuses
// to revert or delete across. Reverts to external snapshots and to
// internal ones whose image nothing else needs work; deletes keep every
// image an internal snapshot sees through.
func TestMixedTree(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		// s1 (internal, in vda.qcow2) ── s2 (external) ── s3 (internal, in vda.s2)
		e.write(0)
		e.snap("s1", 0)
		e.write(1)
		e.snap("s2", driver.CreateDiskOnly)
		e.write(2)
		e.snap("s3", 0)
		e.write(3)
		e.expectChain("vda", "vda.s2", "vda.qcow2")
		e.expectInternalSnapshots("vda.qcow2", "s1")
		e.expectInternalSnapshots("vda.s2", "s3")
		e.verify()

		e.revert("s3", 0)
		e.expectChain("vda", "vda.s2", "vda.qcow2")
		e.write(0)

		// Revert to the external s2: vda.s2 holds s3, so it stays.
		e.revert("s2", 0)
		e.expectChain("vda", "vda.s2-1", "vda.qcow2")
		e.expectInternalSnapshots("vda.s2", "s3")
		e.write(2)

		// s1 lives in vda.qcow2, which is s2's state and backs vda.s2 (which
		// holds s3): applying it there would change what s2 and s3 hold, so
		// its content is copied into a new image instead (vda.qcow2 has no
		// backing file: a standalone one).
		e.revert("s1", 0)
		e.expectChain("vda", "vda.s1")
		e.expectChain("vdb", "vdb.s1")
		e.expectInternalSnapshots("vda.qcow2", "s1")
		e.expectInternalSnapshots("vda.s2", "s3")
		e.write(2)

		// Back to s3, in the image the active layer left.
		e.revert("s3", 0)
		e.expectChain("vda", "vda.s2", "vda.qcow2")
		e.write(1)

		// Delete the external s2, whose overlay holds the internal s3: the
		// images cannot merge (s3 sees through to vda.qcow2); kept.
		rep := e.del("s2", 0)
		if a := action(rep, "s2", "vda"); a != driver.ActionInternalAbove {
			t.Fatalf("delete s2: vda %q, want %q (%+v)", a, driver.ActionInternalAbove, rep)
		}
		e.expectChain("vda", "vda.s2", "vda.qcow2")
		e.expectParent("s3", "s1")
		e.revert("s3", 0)

		// With s3 gone nothing keeps vda.s2 apart from vda.qcow2, which no
		// external snapshot needs and which holds s1: the delete commits
		// vda.s2 down into it (a pull-up would remove s1 with vda.qcow2).
		rep = e.del("s3", 0)
		for _, disk := range e.disks {
			if len(rep.Coalesced) != 2 || !slices.ContainsFunc(rep.Coalesced, func(m driver.Merge) bool {
				return m.Disk == disk && m.Layer == e.path(disk+".qcow2") && m.Action == driver.ActionMergedDown && m.Removed == e.path(disk+".s2")
			}) {
				t.Fatalf("delete s3 merged %+v, want %s.s2 committed into %s.qcow2", rep.Coalesced, disk, disk)
			}
		}
		e.expectChain("vda", "vda.qcow2")
		e.expectChain("vdb", "vdb.qcow2")
		e.expectInternalSnapshots("vda.qcow2", "s1")
		e.expectCurrent("s1")

		// Back to s1 once more: applied in vda.qcow2, the active layer.
		e.revert("s1", 0)
		e.expectChain("vda", "vda.qcow2")
		e.expectChain("vdb", "vdb.qcow2")
		e.expectPool("vda.qcow2", "vdb.qcow2")
		e.del("s1", 0)
		e.finish()
	})
}

// TestMixedSnapshot: one snapshot with an internal and an external disk
// (libvirt refuses to take it on an inactive domain), then the opposite
// mix; reverts and deletes of both.
func TestMixedSnapshot(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		s1 := e.create(`<domainsnapshot><name>s1</name><disks>
			<disk name='vda' snapshot='internal'/>
			<disk name='vdb' snapshot='external'/>
		</disks></domainsnapshot>`, 0)
		if s1.Disk("vda").Mode != driver.DiskInternal || s1.Disk("vdb").Mode != driver.DiskExternal {
			t.Fatalf("s1 disks %+v", s1.Disks)
		}
		e.expectChain("vda", "vda.qcow2")
		e.expectChain("vdb", "vdb.s1", "vdb.qcow2")
		e.expectInternalSnapshots("vda.qcow2", "s1")
		e.expectSet(driver.ListExternal, "s1")
		e.write(1)

		e.revert("s1", 0)
		e.expectChain("vda", "vda.qcow2")
		e.expectChain("vdb", "vdb.s1-1", "vdb.qcow2")
		e.write(2)

		e.create(`<domainsnapshot><name>s2</name><disks>
			<disk name='vda' snapshot='external'/>
			<disk name='vdb' snapshot='internal'/>
		</disks></domainsnapshot>`, 0)
		e.expectChain("vda", "vda.s2", "vda.qcow2")
		e.expectChain("vdb", "vdb.s1-1", "vdb.qcow2")
		e.expectInternalSnapshots("vdb.s1-1", "s2")
		e.write(3)
		e.revert("s2", 0)
		e.expectChain("vda", "vda.s2-1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s1-1", "vdb.qcow2")
		e.write(0)

		// Delete the non-leaf mixed s1: vda's internal snapshot goes; vdb's
		// state image stays under vdb.s1-1, which holds the internal s2.
		rep := e.del("s1", 0)
		if a := action(rep, "s1", "vda"); a != driver.ActionInternalDeleted {
			t.Fatalf("delete s1: vda %q (%+v)", a, rep)
		}
		if a := action(rep, "s1", "vdb"); a != driver.ActionInternalAbove {
			t.Fatalf("delete s1: vdb %q, want %q (%+v)", a, driver.ActionInternalAbove, rep)
		}
		e.expectInternalSnapshots("vda.qcow2")
		e.expectChain("vdb", "vdb.s1-1", "vdb.qcow2")
		e.revert("s2", 0)

		rep = e.del("s2", 0)
		if a := action(rep, "s2", "vda"); a != driver.ActionPulledUp && a != driver.ActionMergedDown {
			t.Fatalf("delete s2: vda %q, want a merge (%+v)", a, rep)
		}
		if c := e.chainOf("vda"); len(c) != 1 {
			t.Fatalf("vda after deleting s2: %v", c)
		}
		// vdb's internal s2 was what kept vdb.s1-1 apart from vdb.qcow2,
		// which no snapshot needs: the same delete merges them.
		if len(rep.Coalesced) != 1 || rep.Coalesced[0].Disk != "vdb" || rep.Coalesced[0].Layer != e.path("vdb.qcow2") {
			t.Fatalf("delete s2 merged %+v, want vdb.qcow2 with its child", rep.Coalesced)
		}
		e.expectChain("vdb", "vdb.qcow2")
		e.expectList(0)
		e.finish()
	})
}

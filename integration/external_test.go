package integration

import (
	"os"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// TestExternalLinear: DISK_ONLY snapshots make overlays next to each image
// named after the snapshot (vda.qcow2 → vda.s1), in qcow2, with explicit
// backing formats; reverting to a non-leaf snapshot branches; deleting a
// non-leaf external snapshot (which libvirt refuses) merges or keeps a
// shared base, and every remaining snapshot still reverts to its data.
func TestExternalLinear(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		s1 := e.snap("s1", driver.CreateDiskOnly)
		for _, sd := range s1.Disks {
			if sd.Mode != driver.DiskExternal || sd.Image != e.path(sd.Target+".qcow2") || sd.Overlay != e.path(sd.Target+".s1") {
				t.Fatalf("s1 disk %+v: want external from %s.qcow2 to %s.s1", sd, sd.Target, sd.Target)
			}
		}
		e.expectChain("vda", "vda.s1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s1", "vdb.qcow2")
		e.verify()
		e.write(1)
		e.snap("s2", driver.CreateDiskOnly)
		e.write(2)
		e.snap("s3", driver.CreateDiskOnly)
		e.write(3)
		e.expectChain("vda", "vda.s3", "vda.s2", "vda.s1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s3", "vdb.s2", "vdb.s1", "vdb.qcow2")
		e.verify()
		e.expectList(0, "s1", "s2", "s3")
		e.expectParent("s1", "")
		e.expectParent("s2", "s1")
		e.expectParent("s3", "s2")
		e.expectCurrent("s3")

		// Revert to the non-leaf s2: a new overlay on s2's state image;
		// the abandoned active layer goes, s3's state image stays.
		e.revert("s2", 0)
		e.expectChain("vda", "vda.s2-1", "vda.s1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s2-1", "vdb.s1", "vdb.qcow2")
		if _, err := os.Stat(e.path("vda.s3")); !os.IsNotExist(err) {
			t.Fatalf("the abandoned active layer vda.s3 is still there: %v", err)
		}
		e.write(3)
		e.verify()

		// Delete s2 after reverting to it: its state image vda.s1 backs
		// both s3's state image and the active layer, so it stays.
		rep := e.del("s2", 0)
		if a := action(rep, "s2", "vda"); a != driver.ActionSharedBase {
			t.Fatalf("delete s2: vda %q, want %q (report %+v)", a, driver.ActionSharedBase, rep)
		}
		e.expectChain("vda", "vda.s2-1", "vda.s1", "vda.qcow2")
		e.expectParent("s3", "s1")
		e.expectCurrent("s1")

		// Delete the non-leaf root s1: vda.qcow2 has one child (vda.s1):
		// they merge.
		rep = e.del("s1", 0)
		if a := action(rep, "s1", "vda"); a != driver.ActionPulledUp && a != driver.ActionMergedDown {
			t.Fatalf("delete s1: vda %q, want a merge (report %+v)", a, rep)
		}
		e.expectParent("s3", "")
		e.expectCurrent("")
		e.expectList(0, "s3")
		if len(e.chainOf("vda")) != 2 {
			t.Fatalf("after merging s1, vda's chain is %v", e.chainOf("vda"))
		}

		// s3 still reverts to what it held.
		e.revert("s3", 0)
		e.finish()
	})
}

package integration

import (
	"regexp"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

// TestRedefineRefusesClaimedImages: a redefine may not give a snapshot
// the overlay or state image another snapshot's record names, whether the
// snapshot is new (a copy of another's XML under a new name) or an
// existing internal one redefined as external; deleting such a copy would
// merge the overlay's data into the other snapshot's state image. The
// other snapshot's data is read back after each refusal and after a
// revert, and a redefine of a snapshot whose record went with metadata
// only is still accepted.
func TestRedefineRefusesClaimedImages(t *testing.T) {
	both(t, []diskDef{{Target: "vda"}}, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("i1", 0)
		e.write(1)
		e.snap("e1", driver.CreateDiskOnly)
		e.write(2)
		e1XML, err := e.d.SnapshotGetXMLDesc(e.ctx, e.dom, "e1", 0)
		if err != nil {
			t.Fatal(err)
		}
		nameRE := regexp.MustCompile(`<name>e1</name>`)
		cp := nameRE.ReplaceAllString(e1XML, "<name>copy</name>")
		_, err = e.d.SnapshotCreateXML(e.ctx, e.dom, cp, driver.CreateRedefine)
		expectErr(t, err, driver.ErrInvalidArg, errdefs.CodeInvalidArg)
		if !strings.Contains(err.Error(), "snapshot e1's") {
			t.Fatalf("refusal %q does not name the snapshot that owns the image", err)
		}
		e.verify()

		// i1, redefined as external on e1's overlay.
		i1XML, err := e.d.SnapshotGetXMLDesc(e.ctx, e.dom, "i1", 0)
		if err != nil {
			t.Fatal(err)
		}
		disksRE := regexp.MustCompile(`(?s)<disks>.*</disks>`)
		ext := disksRE.ReplaceAllString(i1XML, "<disks><disk name='vda' snapshot='external'><source file='"+e.path("vda.e1")+"'/></disk></disks>")
		if ext == i1XML {
			t.Fatalf("i1's XML has no <disks> to replace:\n%s", i1XML)
		}
		_, err = e.d.SnapshotCreateXML(e.ctx, e.dom, ext, driver.CreateRedefine)
		expectErr(t, err, driver.ErrInvalidArg, errdefs.CodeInvalidArg)
		e.verify()

		// A snapshot forgotten with metadata only may be recorded again.
		if _, err := e.d.SnapshotDelete(e.ctx, e.dom, "e1", driver.DeleteMetadataOnly); err != nil {
			t.Fatal(err)
		}
		if _, err := e.d.SnapshotCreateXML(e.ctx, e.dom, e1XML, driver.CreateRedefine); err != nil {
			t.Fatalf("redefine of e1 after a metadata-only delete: %v", err)
		}
		e.revert("e1", 0)
		e.revert("i1", 0)
		e.del("e1", 0)
	})
}

package integration

import (
	"regexp"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

var (
	disksElem  = regexp.MustCompile(`(?s)<disks>.*?</disks>`)
	domainElem = regexp.MustCompile(`(?s)<domain[ >].*</domain>`)
)

// TestRedefineWithoutDisks: a redefined document without <disks> gets
// every disk of the domain in its default mode, as libvirt aligns disks
// on redefine (internal, or external for a disk-only snapshot; an
// existing snapshot's recorded mode), so a revert to it puts the disks
// back; without <domain> as well, a revert is
// refused as risky (VIR_ERR_SNAPSHOT_REVERT_RISKY) unless FORCE, which
// reverts the disks. Before, both reverts changed nothing and succeeded.
func TestRedefineWithoutDisks(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("i1", 0)
		e.write(1)
		e.snap("e1", driver.CreateDiskOnly)
		e.write(2)
		redefine := func(name string, forget bool, strip ...*regexp.Regexp) {
			t.Helper()
			doc, err := e.d.SnapshotGetXMLDesc(e.ctx, e.dom, name, 0)
			if err != nil {
				t.Fatal(err)
			}
			if forget { // a new record, not a redefine of the existing one
				if _, err := e.d.SnapshotDelete(e.ctx, e.dom, name, driver.DeleteMetadataOnly); err != nil {
					t.Fatal(err)
				}
			}
			for _, re := range strip {
				doc = re.ReplaceAllString(doc, "")
			}
			if _, err := e.d.SnapshotCreateXML(e.ctx, e.dom, doc, driver.CreateRedefine); err != nil {
				t.Fatalf("redefine %s from\n%s: %v", name, doc, err)
			}
			got, err := e.d.SnapshotGetXMLDesc(e.ctx, e.dom, name, 0)
			if err != nil {
				t.Fatal(err)
			}
			mode := "internal"
			if name == "e1" {
				mode = "external"
			}
			if len(strip) > 1 {
				return // without <domain>, no alignment
			}
			for _, disk := range e.disks {
				if !regexp.MustCompile(`<disk (type='file' )?name='` + disk + `' snapshot='` + mode + `'`).MatchString(got) {
					t.Fatalf("%s redefined without <disks>: disk %s is not %s:\n%s", name, disk, mode, got)
				}
			}
		}
		redefine("i1", true, disksElem)
		e.revert("i1", 0)
		e.write(3)
		redefine("e1", false, disksElem)
		e.revert("e1", 0)

		// Without <domain>: no rollback definition (and, as in libvirt,
		// no alignment).
		redefine("i1", true, domainElem)
		err := e.d.RevertToSnapshot(e.ctx, e.dom, "i1", 0)
		expectErr(t, err, driver.ErrRevertRisky, errdefs.CodeSnapshotRevertRisky)
		if want := "snapshot 'i1' lacks domain '" + e.dom + "' rollback info"; !strings.Contains(err.Error(), want) {
			t.Fatalf("risky revert: %q, want %q", err, want)
		}
		e.verify()
		e.write(0)
		e.revert("i1", driver.RevertForce)

		// Without either, FORCE would revert nothing: refused too.
		redefine("i1", true, disksElem, domainElem)
		err = e.d.RevertToSnapshot(e.ctx, e.dom, "i1", 0)
		expectErr(t, err, driver.ErrRevertRisky, errdefs.CodeSnapshotRevertRisky)
		err = e.d.RevertToSnapshot(e.ctx, e.dom, "i1", driver.RevertForce)
		expectErr(t, err, driver.ErrOperationInvalid, errdefs.CodeOperationInvalid)
		e.expectData() // i1 now records no disk the model could check
	})
}

// TestRevertResetNVRAM: libvirt 9.0's RESET_NVRAM is accepted; a Xen
// domain has no NVRAM image of xlsnap's to reset.
func TestRevertResetNVRAM(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", 0)
		e.write(1)
		e.revert("s1", driver.RevertResetNVRAM)
	})
}

package integration

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

// TestErrors: every call's typed errors and the libvirt codes they map to
// (no domain 42, no snapshot 72, invalid argument 8, snapshot exists 9 —
// "operation failed" as in libvirt —, XML error 27), and that a refused
// call changes nothing.
func TestErrors(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", driver.CreateDiskOnly)
		e.write(1)
		ctx, d := e.ctx, e.d

		// No domain: through the source (for libvirt, libvirt's own error
		// with its code kept) and through storage.
		const nd = "nosuchdomain"
		noDomain := map[string]error{}
		_, noDomain["SnapshotCreateXML"] = d.SnapshotCreateXML(ctx, nd, snapXML("x"), 0)
		_, noDomain["CreateSnapshot"] = d.CreateSnapshot(ctx, nd, driver.SnapshotRequest{Name: "x"}, 0)
		_, noDomain["REDEFINE"] = d.SnapshotCreateXML(ctx, nd, snapXML("x"), driver.CreateRedefine)
		_, noDomain["ListAllSnapshots"] = d.ListAllSnapshots(ctx, nd, 0)
		_, noDomain["SnapshotListAllChildren"] = d.SnapshotListAllChildren(ctx, nd, "s1", 0)
		_, noDomain["SnapshotNumChildren"] = d.SnapshotNumChildren(ctx, nd, "s1", 0)
		_, noDomain["SnapshotLookupByName"] = d.SnapshotLookupByName(ctx, nd, "s1", 0)
		_, noDomain["SnapshotCurrent"] = d.SnapshotCurrent(ctx, nd, 0)
		_, noDomain["SnapshotGetParent"] = d.SnapshotGetParent(ctx, nd, "s1", 0)
		_, noDomain["SnapshotGetXMLDesc"] = d.SnapshotGetXMLDesc(ctx, nd, "s1", 0)
		_, noDomain["SnapshotIsCurrent"] = d.SnapshotIsCurrent(ctx, nd, "s1", 0)
		_, noDomain["SnapshotHasMetadata"] = d.SnapshotHasMetadata(ctx, nd, "s1", 0)
		noDomain["RevertToSnapshot"] = d.RevertToSnapshot(ctx, nd, "s1", 0)
		_, noDomain["SnapshotDelete"] = d.SnapshotDelete(ctx, nd, "s1", 0)
		noDomain["ChainChanged"] = d.ChainChanged(ctx, nd, "vda")
		_, noDomain["DiskList"] = d.DiskList(ctx, nd)
		for call, err := range noDomain {
			t.Run("no-domain/"+call, func(t *testing.T) { expectErr(t, err, driver.ErrNoDomain, driver.ErrNumNoDomain) })
		}

		// No snapshot.
		noSnap := map[string]error{}
		_, noSnap["SnapshotListAllChildren"] = d.SnapshotListAllChildren(ctx, e.dom, "nope", 0)
		_, noSnap["SnapshotNumChildren"] = d.SnapshotNumChildren(ctx, e.dom, "nope", 0)
		_, noSnap["SnapshotLookupByName"] = d.SnapshotLookupByName(ctx, e.dom, "nope", 0)
		_, noSnap["SnapshotGetParent"] = d.SnapshotGetParent(ctx, e.dom, "nope", 0)
		_, noSnap["SnapshotGetParent(root)"] = d.SnapshotGetParent(ctx, e.dom, "s1", 0)
		_, noSnap["SnapshotGetXMLDesc"] = d.SnapshotGetXMLDesc(ctx, e.dom, "nope", 0)
		_, noSnap["SnapshotIsCurrent"] = d.SnapshotIsCurrent(ctx, e.dom, "nope", 0)
		_, noSnap["SnapshotHasMetadata"] = d.SnapshotHasMetadata(ctx, e.dom, "nope", 0)
		noSnap["RevertToSnapshot"] = d.RevertToSnapshot(ctx, e.dom, "nope", 0)
		_, noSnap["SnapshotDelete"] = d.SnapshotDelete(ctx, e.dom, "nope", 0)
		_, noSnap["SnapshotDelete(children)"] = d.SnapshotDelete(ctx, e.dom, "nope", driver.DeleteChildren)
		for call, err := range noSnap {
			t.Run("no-snapshot/"+call, func(t *testing.T) {
				expectErr(t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)
			})
		}

		// Invalid arguments storage refuses.
		invalid := map[string]error{}
		_, invalid["name starting with -"] = d.SnapshotCreateXML(ctx, e.dom, snapXML("-x"), 0)
		invalid["ChainChanged of no disk"] = d.ChainChanged(ctx, e.dom, "vdz")
		_, invalid["domain name with a slash"] = d.ListAllSnapshots(ctx, "a/b", 0)
		for call, err := range invalid {
			t.Run("invalid/"+call, func(t *testing.T) { expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg) })
		}
		// What the driver refuses as libvirt does, with libvirt's codes
		// (TestLibvirtCodes has each against libvirt itself).
		libvirtCodes := []struct {
			what     string
			err      error
			sentinel error
		}{}
		add := func(what string, sentinel error, err error) {
			libvirtCodes = append(libvirtCodes, struct {
				what     string
				err      error
				sentinel error
			}{what, err, sentinel})
		}
		_, err := d.SnapshotCreateXML(ctx, e.dom, snapXML("x"), driver.CreateCurrent)
		add("CURRENT without REDEFINE", errdefs.ErrInvalidArg, err)
		_, err = d.SnapshotCreateXML(ctx, e.dom, snapXML("a/b"), driver.CreateDiskOnly)
		add("name with a slash", errdefs.ErrXMLDetail, err)
		_, err = d.SnapshotCreateXML(ctx, e.dom, snapXML(".."), driver.CreateDiskOnly)
		add("name .", errdefs.ErrXMLDetail, err)
		_, err = d.SnapshotCreateXML(ctx, e.dom,
			"<domainsnapshot><name>x</name><disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>", driver.CreateDiskOnly)
		add("internal with DISK_ONLY", errdefs.ErrUnsupported, err)
		_, err = d.SnapshotCreateXML(ctx, e.dom,
			"<domainsnapshot><name>x</name><memory snapshot='external' file='"+e.path("mem")+"'/></domainsnapshot>", driver.CreateDiskOnly)
		add("memory with DISK_ONLY", errdefs.ErrXML, err)
		_, err = d.SnapshotLookupByName(ctx, e.dom, "s1", 4)
		add("lookup flags", errdefs.ErrInvalidArg, err)
		err = d.RevertToSnapshot(ctx, e.dom, "s1", driver.RevertRunning|driver.RevertPaused)
		add("RUNNING|PAUSED", errdefs.ErrInvalidArg, err)
		_, err = d.SnapshotDelete(ctx, e.dom, "s1", driver.DeleteChildren|driver.DeleteChildrenOnly)
		add("CHILDREN|CHILDREN_ONLY", errdefs.ErrInvalidArg, err)
		for _, doc := range []string{"<domainsnapshot><name>x</name>", "not xml at all", "<domainsnapshot><name>x</name></wrong>", ""} {
			_, err := d.SnapshotCreateXML(ctx, e.dom, doc, driver.CreateDiskOnly)
			add("malformed "+doc, errdefs.ErrXMLDetail, err)
		}
		// A memory image of a shut-off domain: libvirt's parser refuses
		// memory state in an offline snapshot as an XML error.
		_, err = d.SnapshotCreateXML(ctx, e.dom, "<domainsnapshot><name>x</name><memory snapshot='external' file='"+e.path("mem")+"'/></domainsnapshot>", 0)
		add("memory of a shut-off domain", errdefs.ErrXML, err)
		for _, c := range libvirtCodes {
			t.Run("libvirt/"+c.what, func(t *testing.T) {
				if !errors.Is(c.err, c.sentinel) || errdefs.CodeOf(c.err) != errdefs.CodeOf(c.sentinel) {
					t.Fatalf("error %v (code %d), want %v (code %d)", c.err, errdefs.CodeOf(c.err), c.sentinel, errdefs.CodeOf(c.sentinel))
				}
			})
		}

		// Exists.
		_, err = d.SnapshotCreateXML(ctx, e.dom, snapXML("s1"), driver.CreateDiskOnly)
		expectErr(t, err, driver.ErrSnapshotExists, driver.ErrNumOperationFailed)
		_, err = d.SnapshotCreateXML(ctx, e.dom, snapXML("s1"), 0)
		expectErr(t, err, driver.ErrSnapshotExists, driver.ErrNumOperationFailed)

		// Unknown disk names: libvirt (virDomainSnapshotAlignDisks) reports
		// "no disk named" and "disk specified twice" as
		// VIR_ERR_CONFIG_UNSUPPORTED (67).
		unknown := "<domainsnapshot><name>x</name><disks><disk name='vdz' snapshot='external'/></disks></domainsnapshot>"
		twice := "<domainsnapshot><name>x</name><disks><disk name='vda' snapshot='external'/><disk name='" + e.path("vda.s1") + "' snapshot='external'/></disks></domainsnapshot>"
		for what, doc := range map[string]string{"unknown": unknown, "twice": twice} {
			t.Run("disk-name/"+what, func(t *testing.T) {
				_, err := d.SnapshotCreateXML(ctx, e.dom, doc, driver.CreateDiskOnly)
				if err == nil {
					t.Fatalf("%s disk name accepted", what)
				}
				if got := driver.Code(err); got != driver.ErrNumConfigUnsupported {
					t.Fatalf("%s disk name in snapshot XML: code %d (%v), libvirt reports %d (VIR_ERR_CONFIG_UNSUPPORTED)", what, got, err, driver.ErrNumConfigUnsupported)
				}
			})
		}
		_, err = d.CreateSnapshot(ctx, e.dom, driver.SnapshotRequest{Name: "x", Disks: []driver.DiskRequest{{Name: "vdz"}}}, 0)
		if err == nil {
			t.Fatal("typed request with an unknown disk accepted")
		}

		// Nothing above changed anything.
		e.expectList(0, "s1")
		e.expectCurrent("s1")
		e.expectChain("vda", "vda.s1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s1", "vdb.qcow2")
		e.expectPool("vda.qcow2", "vda.s1", "vdb.qcow2", "vdb.s1")
		e.finish()
	})
}

// TestErrorsBeforeFirstCall: a domain the source has but the driver never
// touched has no snapshots: lookups say "no snapshot" (72), not "no
// domain" (42).
func TestErrorsBeforeFirstCall(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.expectList(0)
		e.expectCurrent("")
		calls := map[string]func() error{
			"SnapshotLookupByName": func() error { _, err := e.d.SnapshotLookupByName(e.ctx, e.dom, "nope", 0); return err },
			"SnapshotGetXMLDesc":   func() error { _, err := e.d.SnapshotGetXMLDesc(e.ctx, e.dom, "nope", 0); return err },
			"SnapshotGetParent":    func() error { _, err := e.d.SnapshotGetParent(e.ctx, e.dom, "nope", 0); return err },
			"SnapshotHasMetadata":  func() error { _, err := e.d.SnapshotHasMetadata(e.ctx, e.dom, "nope", 0); return err },
		}
		for call, fn := range calls {
			t.Run(call, func(t *testing.T) {
				err := fn()
				if errors.Is(err, driver.ErrNoDomain) {
					t.Fatalf("%s on domain %s, which the source has, before any other call: %v (code %d); want no snapshot (72)",
						call, e.dom, err, driver.Code(err))
				}
				expectErr(t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)
			})
		}
	})
}

// TestRevertFlags: RUNNING and PAUSED need a hypervisor back end (typed
// "live unsupported", 84) and change nothing; FORCE is accepted.
func TestRevertFlags(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", driver.CreateDiskOnly)
		e.write(1)
		e.snap("s2", driver.CreateDiskOnly)
		e.write(2)
		for _, f := range []driver.RevertFlags{driver.RevertRunning, driver.RevertPaused,
			driver.RevertRunning | driver.RevertForce, driver.RevertPaused | driver.RevertForce} {
			err := e.d.RevertToSnapshot(e.ctx, e.dom, "s1", f)
			expectErr(t, err, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported)
		}
		e.expectChain("vda", "vda.s2", "vda.s1", "vda.qcow2")
		e.expectCurrent("s2")
		e.expectPool("vda.qcow2", "vda.s1", "vda.s2", "vdb.qcow2", "vdb.s1", "vdb.s2")
		e.verify()
		e.revert("s1", driver.RevertForce)
		e.expectChain("vda", "vda.s1-1", "vda.qcow2")
		e.revert("s2", driver.RevertForce)
		e.expectChain("vda", "vda.s2", "vda.s1", "vda.qcow2")
		e.finish()
	})
}

// TestRunningDomain: a running libvirt domain, with no hypervisor back end
// configured (driver.Config.Hypervisor nil): every call that would change
// its disks fails with a typed error and changes nothing — "live
// unsupported" (84) for snapshots and deletes, "operation invalid" (55)
// for a revert without FORCE (it would stop the domain) —; the read calls
// still work, and once it is shut off everything does again.
func TestRunningDomain(t *testing.T) {
	t.Parallel()
	e := newEnv(t, libvirtSource)
	e.write(0)
	e.snap("s1", driver.CreateDiskOnly)
	e.write(1)
	dom, err := e.lv.Conn().LookupDomainByName(e.dom)
	if err != nil {
		t.Fatal(err)
	}
	defer dom.Free()
	if err := dom.Create(); err != nil {
		t.Fatalf("starting the domain: %v", err)
	}
	_, err = e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML("s2"), driver.CreateDiskOnly)
	expectErr(t, err, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported)
	// libvirt: LIVE is for full system checkpoints only (84 too).
	_, err = e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML("s2"), driver.CreateDiskOnly|driver.CreateLive)
	expectErr(t, err, errdefs.ErrLiveUnsupported, driver.ErrNumOperationUnsupported)
	// No flags: a full system checkpoint, which needs a back end too.
	_, err = e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML("s2"), 0)
	expectErr(t, err, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported)
	_, err = e.d.CreateSnapshot(e.ctx, e.dom, driver.SnapshotRequest{Name: "s2"}, 0)
	expectErr(t, err, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported)
	// libvirt: a revert that must stop the guest is "risky" (77) without FORCE.
	err = e.d.RevertToSnapshot(e.ctx, e.dom, "s1", 0)
	expectErr(t, err, errdefs.ErrRevertRisky, errdefs.CodeSnapshotRevertRisky)
	err = e.d.RevertToSnapshot(e.ctx, e.dom, "s1", driver.RevertRunning)
	expectErr(t, err, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported)
	_, err = e.d.SnapshotDelete(e.ctx, e.dom, "s1", 0)
	expectErr(t, err, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported)
	e.expectList(0, "s1")
	e.expectCurrent("s1")
	e.expectChain("vda", "vda.s1", "vda.qcow2")
	e.verify()

	// FORCE would stop the domain first, which needs a back end to stop it.
	t.Run("revert-force", func(t *testing.T) {
		panicked, err := noPanic(func() error { return e.d.RevertToSnapshot(e.ctx, e.dom, "s1", driver.RevertForce) })
		if panicked != nil {
			t.Fatalf("RevertToSnapshot(FORCE) of a running domain with no Hypervisor configured panics: %v", panicked)
		}
		expectErr(t, err, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported)
	})
	e.expectChain("vda", "vda.s1", "vda.qcow2")
	if active, _ := dom.IsActive(); !active {
		t.Fatal("the domain stopped")
	}

	if err := dom.Destroy(); err != nil {
		t.Fatal(err)
	}
	e.snap("s2", driver.CreateDiskOnly)
	e.write(2)
	e.revert("s1", 0)
	e.del("s2", 0)
	e.finish()
}

// noPanic runs fn and returns its error, or what it panicked with.
func noPanic(fn func() error) (panicked any, err error) {
	defer func() { panicked = recover() }()
	return nil, fn()
}

// TestDomainGoneFromSource: once the source no longer has a domain, every
// call says "no domain" (42), whatever storage still records.
func TestDomainGoneFromSource(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", driver.CreateDiskOnly)
		switch e.kind {
		case dirSource:
			if err := os.Remove(filepath.Join(e.defDir, e.dom+".xml")); err != nil {
				t.Fatal(err)
			}
		case libvirtSource:
			dom, err := e.lv.Conn().LookupDomainByName(e.dom)
			if err != nil {
				t.Fatal(err)
			}
			if err := dom.Undefine(); err != nil {
				t.Fatal(err)
			}
			dom.Free()
		}
		calls := map[string]func() error{
			"ListAllSnapshots":     func() error { _, err := e.d.ListAllSnapshots(e.ctx, e.dom, 0); return err },
			"SnapshotCurrent":      func() error { _, err := e.d.SnapshotCurrent(e.ctx, e.dom, 0); return err },
			"SnapshotIsCurrent":    func() error { _, err := e.d.SnapshotIsCurrent(e.ctx, e.dom, "s1", 0); return err },
			"SnapshotLookupByName": func() error { _, err := e.d.SnapshotLookupByName(e.ctx, e.dom, "s1", 0); return err },
			"SnapshotGetXMLDesc":   func() error { _, err := e.d.SnapshotGetXMLDesc(e.ctx, e.dom, "s1", 0); return err },
			"RevertToSnapshot":     func() error { return e.d.RevertToSnapshot(e.ctx, e.dom, "s1", 0) },
			"SnapshotDelete":       func() error { _, err := e.d.SnapshotDelete(e.ctx, e.dom, "s1", 0); return err },
			"DiskList":             func() error { _, err := e.d.DiskList(e.ctx, e.dom); return err },
		}
		for call, fn := range calls {
			t.Run(call, func(t *testing.T) {
				err := fn()
				if err == nil {
					t.Fatalf("%s succeeds on domain %s, which its source no longer has (the other calls say no domain, 42)", call, e.dom)
				}
				expectErr(t, err, driver.ErrNoDomain, driver.ErrNumNoDomain)
			})
		}
	})
}

package integration

import (
	"fmt"
	"os"
	"slices"
	"strconv"
	"testing"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

// TestDiskSnapshotAttribute: a disk's own snapshot="..." attribute in the
// domain XML is its default mode (snapshot="no" leaves it out, "external"
// makes an overlay even without DISK_ONLY); the snapshot XML overrides it;
// a revert leaves a disk the snapshot did not cover as it is.
func TestDiskSnapshotAttribute(t *testing.T) {
	disks := []diskDef{{Target: "vda"}, {Target: "vdb", Snapshot: "no"}, {Target: "vdc", Snapshot: "external"}}
	both(t, disks, func(t *testing.T, e *env) {
		e.write(0)
		s1 := e.snap("s1", 0)
		for disk, mode := range map[string]driver.DiskMode{"vda": driver.DiskInternal, "vdb": driver.DiskNone, "vdc": driver.DiskExternal} {
			if got := s1.Disk(disk).Mode; got != mode {
				t.Fatalf("s1 %s: mode %q, want %q", disk, got, mode)
			}
		}
		e.expectChain("vda", "vda.qcow2")
		e.expectChain("vdb", "vdb.qcow2")
		e.expectChain("vdc", "vdc.s1", "vdc.qcow2")
		e.expectInternalSnapshots("vda.qcow2", "s1")
		e.expectInternalSnapshots("vdb.qcow2")
		e.write(1)

		s2 := e.snap("s2", driver.CreateDiskOnly)
		if s2.Disk("vda").Mode != driver.DiskExternal || s2.Disk("vdb").Mode != driver.DiskNone {
			t.Fatalf("s2 disks %+v", s2.Disks)
		}
		e.expectChain("vda", "vda.s2", "vda.qcow2")
		e.expectChain("vdb", "vdb.qcow2")
		e.expectChain("vdc", "vdc.s2", "vdc.s1", "vdc.qcow2")
		e.write(2)

		// The snapshot XML wins over the attribute.
		s3 := e.create(`<domainsnapshot><name>s3</name><disks><disk name='vdb' snapshot='external'/></disks></domainsnapshot>`, driver.CreateDiskOnly)
		if s3.Disk("vdb").Mode != driver.DiskExternal {
			t.Fatalf("s3 disks %+v", s3.Disks)
		}
		e.expectChain("vdb", "vdb.s3", "vdb.qcow2")
		e.write(3)

		// vdb was not in s2: reverting to s2 leaves it on vdb.s3 as it is.
		e.revert("s2", 0)
		e.expectChain("vda", "vda.s2-1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s3", "vdb.qcow2")
		e.expectChain("vdc", "vdc.s2-1", "vdc.s1", "vdc.qcow2")
		e.write(3)
		e.revert("s3", 0)
		e.expectChain("vdb", "vdb.s3-1", "vdb.qcow2")

		// The attributes survive every rewrite of the definition.
		for _, disk := range e.definition().Devices.Disks {
			if disk.Target == nil {
				continue
			}
			want := map[string]string{"vda": "", "vdb": "no", "vdc": "external", "hdc": ""}[disk.Target.Dev]
			if disk.Snapshot != want {
				t.Fatalf("definition: disk %s snapshot=%q, want %q", disk.Target.Dev, disk.Snapshot, want)
			}
		}
		e.finish()
	})
}

// TestCreateFlags: LIVE on a shut-off domain is a typed "live
// unsupported" (code 84), QUIESCE a typed "unsupported" (67), CURRENT
// without REDEFINE an invalid argument (8), and none of them changes
// anything; HALT (nothing to stop), ATOMIC and VALIDATE are accepted.
func TestCreateFlags(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		refused := []struct {
			flags    driver.CreateFlags
			sentinel error
			code     driver.ErrorNumber
		}{
			{driver.CreateLive, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported},
			{driver.CreateLive | driver.CreateDiskOnly, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported},
			{driver.CreateQuiesce | driver.CreateDiskOnly, driver.ErrUnsupported, driver.ErrNumConfigUnsupported},
			// libvirt: QUIESCE requires DISK_ONLY; with it, a guest agent.
			{driver.CreateQuiesce, errdefs.ErrInvalidArg, driver.ErrNumInvalidArg},
			{driver.CreateQuiesce | driver.CreateDiskOnly, driver.ErrUnsupported, driver.ErrNumConfigUnsupported},
			{driver.CreateCurrent, driver.ErrInvalidArg, driver.ErrNumInvalidArg},
			{driver.CreateCurrent | driver.CreateDiskOnly, driver.ErrInvalidArg, driver.ErrNumInvalidArg},
		}
		for _, c := range refused {
			_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML("refused"), c.flags)
			expectErr(t, err, c.sentinel, c.code)
		}
		e.expectList(0)
		e.expectCurrent("")
		e.expectChain("vda", "vda.qcow2")
		e.expectChain("vdb", "vdb.qcow2")
		e.expectInternalSnapshots("vda.qcow2")
		e.expectPool("vda.qcow2", "vdb.qcow2")

		e.snap("halt", driver.CreateDiskOnly|driver.CreateHalt)
		e.expectChain("vda", "vda.halt", "vda.qcow2")
		e.write(1)
		e.snap("atomic", driver.CreateDiskOnly|driver.CreateAtomic)
		e.expectChain("vda", "vda.atomic", "vda.halt", "vda.qcow2")
		e.write(2)
		e.snap("validate", driver.CreateDiskOnly|driver.CreateValidate)
		e.expectChain("vda", "vda.validate", "vda.atomic", "vda.halt", "vda.qcow2")
		e.write(3)
		e.snap("all", driver.CreateHalt|driver.CreateAtomic|driver.CreateValidate)
		e.expectInternalSnapshots("vda.validate", "all")
		e.write(0)
		e.expectList(driver.ListTopological, "halt", "atomic", "validate", "all")
		e.revert("atomic", 0)
		e.revert("all", 0)
		e.revert("halt", driver.RevertForce)
		e.finish()
	})
}

// TestAtomicFailure: when the second disk's overlay cannot be made, the
// first disk's new overlay is removed again: no snapshot, no change.
func TestAtomicFailure(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.snap("s1", driver.CreateDiskOnly)
		e.write(1)
		doc := `<domainsnapshot><name>s2</name><disks>
			<disk name='vda' snapshot='external'/>
			<disk name='vdb' snapshot='external'><source file='` + e.path("missing-folder/vdb.s2") + `'/></disk>
		</disks></domainsnapshot>`
		if _, err := e.d.SnapshotCreateXML(e.ctx, e.dom, doc, driver.CreateDiskOnly|driver.CreateAtomic); err == nil {
			t.Fatal("a snapshot whose overlay cannot be created succeeded")
		}
		if _, err := os.Stat(e.path("vda.s2")); !os.IsNotExist(err) {
			t.Fatalf("vda's overlay of the failed snapshot is there: %v", err)
		}
		e.expectChain("vda", "vda.s1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s1", "vdb.qcow2")
		e.expectList(0, "s1")
		e.expectCurrent("s1")
		e.verify()

		// An overlay path that exists already, without REUSE_EXT: refused
		// before anything is made.
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", e.path("vdb.s2"), diskSize)
		_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML("s2"), driver.CreateDiskOnly|driver.CreateAtomic)
		expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
		if _, err := os.Stat(e.path("vda.s2")); !os.IsNotExist(err) {
			t.Fatalf("vda's overlay of the refused snapshot is there: %v", err)
		}
		os.Remove(e.path("vdb.s2"))
		e.expectList(0, "s1")
		e.snap("s2", driver.CreateDiskOnly|driver.CreateAtomic)
		e.expectChain("vdb", "vdb.s2", "vdb.s1", "vdb.qcow2")
		e.write(2)
		e.revert("s1", 0)
		e.finish()
	})
}

// TestNoMetadata: NO_METADATA changes the disks (an overlay, or an
// internal snapshot) and records no snapshot: not listed, not current,
// not a parent.
func TestNoMetadata(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		s := e.snap("nm1", driver.CreateDiskOnly|driver.CreateNoMetadata)
		if s.Name != "nm1" {
			t.Fatalf("NO_METADATA returned %+v", s)
		}
		e.expectChain("vda", "vda.nm1", "vda.qcow2")
		e.expectChain("vdb", "vdb.nm1", "vdb.qcow2")
		e.expectList(0)
		e.expectList(driver.ListNoMetadata)
		e.expectCurrent("")
		_, err := e.d.SnapshotLookupByName(e.ctx, e.dom, "nm1", 0)
		expectErr(t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)
		_, err = e.d.SnapshotHasMetadata(e.ctx, e.dom, "nm1", 0)
		expectErr(t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)
		e.verify()
		e.write(1)

		e.snap("s2", driver.CreateDiskOnly)
		e.expectParent("s2", "")
		e.expectChain("vda", "vda.s2", "vda.nm1", "vda.qcow2")
		e.write(2)
		e.snap("nm3", driver.CreateNoMetadata) // internal, in vda.s2
		e.expectInternalSnapshots("vda.s2", "nm3")
		e.expectList(0, "s2")
		e.expectCurrent("s2")
		e.expectSet(driver.ListMetadata, "s2")
		e.expectSet(driver.ListNoMetadata)
		e.write(3)

		// The revert leaves vda.qcow2 unmerged: no metadata needs it, but it
		// could be merged before the revert too (a backup may be reading
		// it). check says so; coalesce merges it.
		e.revert("s2", 0)
		e.expectChain("vda", "vda.s2-1", "vda.nm1", "vda.qcow2")
		problems, err := e.d.Check(e.ctx, false)
		if err != nil {
			t.Fatal(err)
		}
		if len(problems) != 2 || problems[0].Kind != driver.ProblemCoalescible || problems[1].Kind != driver.ProblemCoalescible {
			t.Fatalf("check: %+v, want vda and vdb coalescible", problems)
		}
		rep, err := e.d.Coalesce(e.ctx, e.dom, 0)
		if err != nil {
			t.Fatal(err)
		}
		if len(rep.Merges) != 2 {
			t.Fatalf("coalesce: %+v", rep.Merges)
		}
		e.expectChain("vda", "vda.s2-1", "vda.qcow2")
		e.expectChain("vdb", "vdb.s2-1", "vdb.qcow2")
		e.finish()
	})
}

// TestReuseExt: REUSE_EXT takes overlays made beforehand (their data
// included); without it an existing file is refused, and a reused file
// must be backed by the disk's active layer.
func TestReuseExt(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		for _, disk := range e.disks {
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", e.path(disk+".qcow2"), "-F", "qcow2", e.path(disk+"-pre.qcow2"))
		}
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", e.path("stray.qcow2"), diskSize)
		doc := func(vda, vdb string) string {
			return `<domainsnapshot><name>s1</name><disks>
				<disk name='vda' snapshot='external'><driver type='qcow2'/><source file='` + e.path(vda) + `'/></disk>
				<disk name='vdb' snapshot='external'><source file='` + e.path(vdb) + `'/></disk>
			</disks></domainsnapshot>`
		}
		_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, doc("vda-pre.qcow2", "vdb-pre.qcow2"), driver.CreateDiskOnly)
		expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
		_, err = e.d.SnapshotCreateXML(e.ctx, e.dom, doc("vda-pre.qcow2", "stray.qcow2"), driver.CreateDiskOnly|driver.CreateReuseExt)
		expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
		e.expectChain("vda", "vda.qcow2")
		e.expectList(0)
		os.Remove(e.path("stray.qcow2"))

		// What a reused overlay holds already shows through once it is used
		// (s1 holds what the disk read before).
		run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x3c %d %d", regionOff(2), regionLen), e.path("vda-pre.qcow2"))
		e.verify()
		e.create(doc("vda-pre.qcow2", "vdb-pre.qcow2"), driver.CreateDiskOnly|driver.CreateReuseExt)
		c := e.now["vda"]
		c[2] = 0x3c
		e.now["vda"] = c
		e.verify()
		e.expectChain("vda", "vda-pre.qcow2", "vda.qcow2")
		e.expectChain("vdb", "vdb-pre.qcow2", "vdb.qcow2")
		e.write(1)
		e.snap("s2", driver.CreateDiskOnly)
		e.expectChain("vda", "vda-pre.s2", "vda-pre.qcow2", "vda.qcow2")
		e.write(2)
		e.revert("s1", 0)
		e.expectChain("vda", "vda.s1", "vda.qcow2")
		e.revert("s2", 0)
		e.expectChain("vda", "vda-pre.s2", "vda-pre.qcow2", "vda.qcow2")
		e.verify()

		// Deleting them all merges what xlsnap made; the reused overlays
		// and the images below them are the user's files, so each disk
		// ends on its reused overlay over its own image, both kept.
		rep := e.del("s1", driver.DeleteChildren)
		for _, disk := range e.disks {
			if c := e.chainOf(disk); !slices.Equal(c, []string{disk + "-pre.qcow2", disk + ".qcow2"}) {
				t.Fatalf("%s after deleting every snapshot: %v", disk, c)
			}
			if a := action(rep, "s1", disk); a != driver.ActionUserImage {
				t.Fatalf("s1/%s: %s, want %s", disk, a, driver.ActionUserImage)
			}
		}
		e.finish()
	})
}

// TestDefaultName: an empty name is the time in seconds (libvirt's
// default), for the XML and the typed call alike.
func TestDefaultName(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		before := time.Now().Unix()
		s := e.create("<domainsnapshot><description>no name</description></domainsnapshot>", driver.CreateDiskOnly)
		after := time.Now().Unix()
		secs, err := strconv.ParseInt(s.Name, 10, 64)
		if err != nil || secs < before || secs > after {
			t.Fatalf("default name %q, want the time in seconds in [%d, %d]", s.Name, before, after)
		}
		e.expectChain("vda", "vda."+s.Name, "vda.qcow2")
		e.write(0)
		// The typed call in another second, so the names differ.
		for time.Now().Unix() == secs {
			time.Sleep(10 * time.Millisecond)
		}
		s2, err := e.d.CreateSnapshot(e.ctx, e.dom, driver.SnapshotRequest{}, driver.CreateDiskOnly)
		if err != nil {
			t.Fatal(err)
		}
		e.taken(s2, driver.CreateDiskOnly)
		if n, err := strconv.ParseInt(s2.Name, 10, 64); err != nil || n <= secs {
			t.Fatalf("typed default name %q after %d", s2.Name, secs)
		}
		e.expectChain("vda", "vda."+s2.Name, "vda."+s.Name, "vda.qcow2")
		e.write(1)
		e.revert(s.Name, 0)
		e.finish()
	})
}

// TestOverlayPaths: a disk named by its source path, an explicit overlay
// file and format, and the refusals: a path outside the pools, a format
// that cannot have a backing file, a disk named twice.
func TestOverlayPaths(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		outside := t.TempDir() + "/out.qcow2"
		for _, c := range []struct {
			doc      string
			sentinel error
			code     driver.ErrorNumber
		}{
			{`<domainsnapshot><name>x</name><disks><disk name='vda' snapshot='external'><source file='` + outside + `'/></disk></disks></domainsnapshot>`,
				driver.ErrInvalidArg, driver.ErrNumInvalidArg},
			{`<domainsnapshot><name>x</name><disks><disk name='vda' snapshot='external'><driver type='raw'/></disk></disks></domainsnapshot>`,
				driver.ErrUnsupported, driver.ErrNumConfigUnsupported},
			{`<domainsnapshot><name>x</name><disks><disk name='vda' snapshot='bogus'/></disks></domainsnapshot>`,
				errdefs.ErrXML, driver.ErrNumXML},
		} {
			_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, c.doc, driver.CreateDiskOnly)
			expectErr(t, err, c.sentinel, c.code)
		}
		if _, err := os.Stat(outside); !os.IsNotExist(err) {
			t.Fatalf("an overlay outside the pool was made: %v", err)
		}
		e.expectList(0)
		e.expectPool("vda.qcow2", "vdb.qcow2")

		e.create(`<domainsnapshot><name>s1</name><disks>
			<disk name='`+e.path("vda.qcow2")+`' snapshot='external'><driver type='qcow2'/><source file='`+e.path("custom-a.img")+`'/></disk>
			<disk name='vdb' snapshot='no'/>
		</disks></domainsnapshot>`, driver.CreateDiskOnly)
		e.expectChain("vda", "custom-a.img", "vda.qcow2")
		e.expectChain("vdb", "vdb.qcow2")
		e.write(1)
		// The default overlay of a file with another extension.
		e.snap("s2", driver.CreateDiskOnly)
		e.expectChain("vda", "custom-a.s2", "custom-a.img", "vda.qcow2")
		e.expectChain("vdb", "vdb.s2", "vdb.qcow2")
		e.write(2)
		e.revert("s1", 0)
		e.revert("s2", 0)
		e.finish()
	})
}

// TestTypedRequest: CreateSnapshot's typed request takes the same path as
// the equivalent snapshot XML: the same records, overlays, XML and data.
func TestTypedRequest(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		typed, err := e.d.CreateSnapshot(e.ctx, e.dom, driver.SnapshotRequest{
			Name: "t1", Description: "typed",
			Disks: []driver.DiskRequest{{Name: "vda", External: true}, {Name: "vdb", Skip: true}},
		}, 0)
		if err != nil {
			t.Fatal(err)
		}
		e.taken(typed, 0)
		e.write(1)
		viaXML := e.create(`<domainsnapshot><name>x1</name><description>typed</description><disks>
			<disk name='vda' snapshot='external'/><disk name='vdb' snapshot='no'/>
		</disks></domainsnapshot>`, 0)
		e.expectChain("vda", "vda.x1", "vda.t1", "vda.qcow2")
		e.expectChain("vdb", "vdb.qcow2")
		sameShape(t, e, typed, viaXML)
		e.write(2)

		// Internal by default, with an explicit overlay and format.
		typed, err = e.d.CreateSnapshot(e.ctx, e.dom, driver.SnapshotRequest{
			Name: "t2",
			Disks: []driver.DiskRequest{{Name: "vda"},
				{Name: e.path("vdb.qcow2"), External: true, ExternalFormat: "qcow2", ExternalPath: e.path("vdb-t2.qcow2")}},
		}, 0)
		if err != nil {
			t.Fatal(err)
		}
		e.taken(typed, 0)
		e.write(3)
		viaXML = e.create(`<domainsnapshot><name>x2</name><disks>
			<disk name='vda' snapshot='internal'/>
			<disk name='`+e.path("vdb-t2.qcow2")+`' snapshot='external'><driver type='qcow2'/><source file='`+e.path("vdb-x2.qcow2")+`'/></disk>
		</disks></domainsnapshot>`, 0)
		e.expectInternalSnapshots("vda.x1", "t2", "x2")
		e.expectChain("vdb", "vdb-x2.qcow2", "vdb-t2.qcow2", "vdb.qcow2")
		sameShape(t, e, typed, viaXML)
		e.write(0)

		// DISK_ONLY with no disks listed: every disk external.
		typed, err = e.d.CreateSnapshot(e.ctx, e.dom, driver.SnapshotRequest{Name: "t3"}, driver.CreateDiskOnly)
		if err != nil {
			t.Fatal(err)
		}
		e.taken(typed, driver.CreateDiskOnly)
		e.expectChain("vda", "vda.t3", "vda.x1", "vda.t1", "vda.qcow2")
		e.expectChain("vdb", "vdb-x2.t3", "vdb-x2.qcow2", "vdb-t2.qcow2", "vdb.qcow2")
		e.write(1)

		// The typed refusals match the XML ones.
		for _, c := range []struct {
			req      driver.SnapshotRequest
			flags    driver.CreateFlags
			sentinel error
			code     driver.ErrorNumber
		}{
			// libvirt's parser: memory state in an offline snapshot is an
			// XML error, shut off or DISK_ONLY.
			{driver.SnapshotRequest{Name: "r", Memory: true, MemoryPath: e.path("mem")}, 0, errdefs.ErrXML, driver.ErrNumXML},
			{driver.SnapshotRequest{Name: "r", Memory: true, MemoryPath: e.path("mem")}, driver.CreateDiskOnly, errdefs.ErrXML, driver.ErrNumXML},
			{driver.SnapshotRequest{Name: "r", Disks: []driver.DiskRequest{{Name: "vda", External: true, ExternalFormat: "raw"}}}, 0, driver.ErrUnsupported, driver.ErrNumConfigUnsupported},
			{driver.SnapshotRequest{Name: "r", Disks: []driver.DiskRequest{{Name: "vda"}}}, driver.CreateDiskOnly, errdefs.ErrUnsupported, driver.ErrNumConfigUnsupported},
			{driver.SnapshotRequest{Name: "r"}, driver.CreateLive, driver.ErrLiveUnsupported, driver.ErrNumOperationUnsupported},
			{driver.SnapshotRequest{Name: "t1"}, 0, driver.ErrSnapshotExists, driver.ErrNumOperationFailed},
		} {
			_, err := e.d.CreateSnapshot(e.ctx, e.dom, c.req, c.flags)
			expectErr(t, err, c.sentinel, c.code)
		}
		e.expectList(driver.ListTopological, "t1", "x1", "t2", "x2", "t3")
		e.revert("t1", 0)
		e.revert("t2", 0)
		e.revert("x2", 0)
		e.finish()
	})
}

// sameShape compares a typed snapshot with its XML twin: description,
// state, parent chain position and each disk's mode, through the XML
// libvirt would print.
func sameShape(t *testing.T, e *env, a, b *driver.Snapshot) {
	t.Helper()
	pa, pb := e.parseSnapshotXML(a.Name), e.parseSnapshotXML(b.Name)
	if pa.Description != pb.Description || pa.State != pb.State || len(pa.Disks.Disks) != len(pb.Disks.Disks) {
		t.Fatalf("typed %+v and XML %+v differ", pa, pb)
	}
	for i := range pa.Disks.Disks {
		da, db := pa.Disks.Disks[i], pb.Disks.Disks[i]
		if da.Name != db.Name || da.Snapshot != db.Snapshot || (da.Source == nil) != (db.Source == nil) {
			t.Fatalf("disk %d: typed %+v, XML %+v", i, da, db)
		}
	}
}

// parseSnapshotXML is SnapshotGetXMLDesc, parsed.
func (e *env) parseSnapshotXML(name string) *libvirtxml.DomainSnapshot {
	e.t.Helper()
	doc, err := e.d.SnapshotGetXMLDesc(e.ctx, e.dom, name, 0)
	if err != nil {
		e.t.Fatalf("SnapshotGetXMLDesc(%s): %v", name, err)
	}
	var s libvirtxml.DomainSnapshot
	if err := s.Unmarshal(doc); err != nil {
		e.t.Fatalf("the XML of %s does not parse: %v\n%s", name, err, doc)
	}
	return &s
}

package integration

import (
	"fmt"
	"slices"
	"strconv"
	"testing"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

// TestListFilters: every ListAllSnapshots filter, alone and combined, as
// libvirt's virDomainSnapshotObjListGetNames applies them (LEAVES and
// NO_LEAVES each a condition; METADATA all or none; the state group an
// OR; a group with every bit set dropped; AND across groups), topological order, and the
// children calls with and without DESCENDANTS, over a branched tree of
// internal and external snapshots plus redefined ones in other states.
func TestListFilters(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		// s1 (int) ── s2 (ext) ─┬─ s3 (ext)
		//                       └─ s4 (ext) ── s5 (int)
		e.write(0)
		e.snap("s1", 0)
		e.write(1)
		e.snap("s2", driver.CreateDiskOnly)
		e.write(2)
		e.snap("s3", driver.CreateDiskOnly)
		e.revert("s2", 0)
		e.write(3)
		e.snap("s4", driver.CreateDiskOnly)
		e.write(0)
		e.snap("s5", 0)
		e.expectChain("vda", "vda.s4", "vda.s2-1", "vda.qcow2")
		e.expectInternalSnapshots("vda.s4", "s5")
		e.verify()

		all := []string{"s1", "s2", "s3", "s4", "s5"}
		for _, c := range []struct {
			flags driver.ListFlags
			want  []string
		}{
			{0, all},
			{driver.ListRoots, []string{"s1"}},
			{driver.ListLeaves, []string{"s3", "s5"}},
			{driver.ListNoLeaves, []string{"s1", "s2", "s4"}},
			{driver.ListLeaves | driver.ListNoLeaves, nil}, // each a condition: libvirt lists nothing
			{driver.ListMetadata, all},
			{driver.ListNoMetadata, nil},
			{driver.ListMetadata | driver.ListNoMetadata, all},
			{driver.ListInactive, all},
			{driver.ListActive, nil},
			{driver.ListDiskOnly, nil}, // offline DISK_ONLY snapshots are "shutoff", as in libvirt
			{driver.ListInternal, []string{"s1", "s5"}},
			{driver.ListExternal, []string{"s2", "s3", "s4"}},
			{driver.ListInternal | driver.ListExternal, all}, // a group all set is dropped
			{driver.ListLeaves | driver.ListInternal, []string{"s5"}},
			{driver.ListNoLeaves | driver.ListExternal, []string{"s2", "s4"}},
			{driver.ListRoots | driver.ListExternal, nil},
			{driver.ListRoots | driver.ListInternal | driver.ListInactive, []string{"s1"}},
			{driver.ListTopological | driver.ListExternal, []string{"s2", "s3", "s4"}},
			{driver.ListTopological | driver.ListLeaves, []string{"s3", "s5"}},
		} {
			e.expectSet(c.flags, c.want...)
		}
		expectTopological(t, e, driver.ListTopological, 5)

		for _, c := range []struct {
			name  string
			flags driver.ListFlags
			want  []string
		}{
			{"s1", 0, []string{"s2"}},
			{"s1", driver.ListDescendants, []string{"s2", "s3", "s4", "s5"}},
			{"s2", 0, []string{"s3", "s4"}},
			{"s2", driver.ListDescendants, []string{"s3", "s4", "s5"}},
			{"s2", driver.ListDescendants | driver.ListLeaves, []string{"s3", "s5"}},
			{"s2", driver.ListDescendants | driver.ListNoLeaves, []string{"s4"}},
			{"s2", driver.ListDescendants | driver.ListInternal, []string{"s5"}},
			{"s2", driver.ListExternal, []string{"s3", "s4"}},
			{"s1", driver.ListDescendants | driver.ListTopological, []string{"s2", "s3", "s4", "s5"}},
			{"s3", driver.ListDescendants, nil},
			{"s5", 0, nil},
		} {
			list, err := e.d.SnapshotListAllChildren(e.ctx, e.dom, c.name, c.flags)
			if err != nil {
				t.Fatalf("ListAllChildren(%s, %#x): %v", c.name, c.flags, err)
			}
			got := names(list)
			slices.Sort(got)
			if !slices.Equal(got, append([]string{}, c.want...)) {
				t.Fatalf("ListAllChildren(%s, %#x) = %v, want %v", c.name, c.flags, got, c.want)
			}
			n, err := e.d.SnapshotNumChildren(e.ctx, e.dom, c.name, c.flags)
			if err != nil || n != len(c.want) {
				t.Fatalf("NumChildren(%s, %#x) = %d, %v; want %d", c.name, c.flags, n, err, len(c.want))
			}
		}
		// Descendants come parents first.
		list, err := e.d.SnapshotListAllChildren(e.ctx, e.dom, "s1", driver.ListDescendants)
		if err != nil {
			t.Fatal(err)
		}
		if got := names(list); slices.Index(got, "s4") > slices.Index(got, "s5") || got[0] != "s2" {
			t.Fatalf("descendants of s1 %v: not parents first", got)
		}
		_, err = e.d.SnapshotListAllChildren(e.ctx, e.dom, "nope", 0)
		expectErr(t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)
		_, err = e.d.SnapshotNumChildren(e.ctx, e.dom, "nope", driver.ListDescendants)
		expectErr(t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)

		// Snapshots in the other states come from REDEFINE (a disk-only
		// snapshot of a running domain is "disk-snapshot").
		now := time.Now().Unix()
		for _, r := range []struct{ name, state, parent string }{
			{"d1", "disk-snapshot", "s3"}, {"r1", "running", "s5"}, {"p1", "paused", "s5"}, {"x1", "shutdown", "s5"},
		} {
			doc := fmt.Sprintf(`<domainsnapshot><name>%s</name><state>%s</state><creationTime>%d</creationTime>
				<parent><name>%s</name></parent><memory snapshot='no'/><disks>
				<disk name='vda' snapshot='no'/><disk name='vdb' snapshot='no'/></disks></domainsnapshot>`, r.name, r.state, now+1, r.parent)
			if _, err := e.d.SnapshotCreateXML(e.ctx, e.dom, doc, driver.CreateRedefine); err != nil {
				t.Fatalf("REDEFINE %s: %v", r.name, err)
			}
		}
		for _, c := range []struct {
			flags driver.ListFlags
			want  []string
		}{
			{driver.ListDiskOnly, []string{"d1"}},
			// ACTIVE is every state but shutoff and disk-snapshot.
			{driver.ListActive, []string{"p1", "r1", "x1"}},
			{driver.ListInactive, all},
			{driver.ListActive | driver.ListDiskOnly, []string{"d1", "p1", "r1", "x1"}},
			{driver.ListInactive | driver.ListActive, append(slices.Clone(all), "p1", "r1", "x1")},
			{driver.ListInactive | driver.ListDiskOnly, append(slices.Clone(all), "d1")},
			{driver.ListInactive | driver.ListActive | driver.ListDiskOnly, append(slices.Clone(all), "d1", "p1", "r1", "x1")},
			{driver.ListLeaves, []string{"d1", "p1", "r1", "x1"}},
			{driver.ListNoLeaves, []string{"s1", "s2", "s3", "s4", "s5"}},
			{driver.ListLeaves | driver.ListNoLeaves | driver.ListActive, nil},
			{driver.ListLeaves | driver.ListActive, []string{"p1", "r1", "x1"}},
			{driver.ListInternal | driver.ListExternal | driver.ListActive, []string{"p1", "r1", "x1"}},
			{driver.ListMetadata | driver.ListNoMetadata | driver.ListDiskOnly, []string{"d1"}},
			{driver.ListNoMetadata | driver.ListActive, nil},
			{driver.ListExternal | driver.ListActive, nil},
			{driver.ListInternal | driver.ListDiskOnly, []string{"d1"}},
		} {
			e.expectSet(c.flags, c.want...)
		}
		expectTopological(t, e, driver.ListTopological, 9)
		e.expectCurrent("s5")
		e.finish()
	})
}

// expectTopological asserts that a listing has n snapshots and puts
// every parent before its children.
func expectTopological(t *testing.T, e *env, flags driver.ListFlags, n int) {
	t.Helper()
	list, err := e.d.ListAllSnapshots(e.ctx, e.dom, flags)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != n {
		t.Fatalf("topological list %v: want %d snapshots", names(list), n)
	}
	seen := map[string]bool{}
	for _, s := range list {
		if s.Parent != "" && !seen[s.Parent] {
			t.Fatalf("topological list %v: %s before its parent %s", names(list), s.Name, s.Parent)
		}
		seen[s.Name] = true
	}
}

// TestQueries: lookup, current, parent, children count, is-current,
// has-metadata, and the snapshot XML parsed back with libvirtxml: name,
// description, parent, state, creation time, memory, disks, and the
// domain definition of the snapshot's time.
func TestQueries(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		start := time.Now().Unix()
		e.write(0)
		e.create("<domainsnapshot><name>s1</name><description>first one</description></domainsnapshot>", driver.CreateDiskOnly)
		e.write(1)
		e.snap("s2", 0)
		e.write(2)

		s1, err := e.d.SnapshotLookupByName(e.ctx, e.dom, "s1", 0)
		if err != nil {
			t.Fatal(err)
		}
		if s1.Name != "s1" || s1.Description != "first one" || s1.Parent != "" || s1.State != "shutoff" || len(s1.Disks) != 2 {
			t.Fatalf("s1 = %+v", s1)
		}
		_, err = e.d.SnapshotLookupByName(e.ctx, e.dom, "s1", 1)
		expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
		e.expectCurrent("s2")
		e.expectParent("s2", "s1")
		e.expectParent("s1", "")
		for name, n := range map[string]int{"s1": 1, "s2": 0} {
			if got, err := e.d.SnapshotNumChildren(e.ctx, e.dom, name, 0); err != nil || got != n {
				t.Fatalf("NumChildren(%s) = %d, %v; want %d", name, got, err, n)
			}
		}
		for _, name := range []string{"s1", "s2"} {
			if has, err := e.d.SnapshotHasMetadata(e.ctx, e.dom, name, 0); err != nil || !has {
				t.Fatalf("HasMetadata(%s) = %v, %v", name, has, err)
			}
		}

		x1 := e.parseSnapshotXML("s1")
		if x1.Name != "s1" || x1.Description != "first one" || x1.State != "shutoff" || x1.Parent != nil {
			t.Fatalf("XML of s1: %+v", x1)
		}
		if secs, err := strconv.ParseInt(x1.CreationTime, 10, 64); err != nil || secs < start || secs > time.Now().Unix() {
			t.Fatalf("XML of s1: creationTime %q, want in [%d, now]", x1.CreationTime, start)
		}
		if x1.Memory == nil || x1.Memory.Snapshot != "no" {
			t.Fatalf("XML of s1: memory %+v", x1.Memory)
		}
		if x1.Disks == nil || len(x1.Disks.Disks) != 2 {
			t.Fatalf("XML of s1: disks %+v", x1.Disks)
		}
		for _, sd := range x1.Disks.Disks {
			if sd.Snapshot != "external" || sd.Source == nil || sd.Source.File == nil ||
				sd.Source.File.File != e.path(sd.Name+".s1") || sd.Driver == nil || sd.Driver.Type != "qcow2" {
				t.Fatalf("XML of s1: disk %+v", sd)
			}
		}
		// The definition at s1's time: the disks on their base images.
		if x1.Domain == nil || x1.Domain.Name != e.dom || x1.Domain.Devices == nil {
			t.Fatalf("XML of s1: domain %+v", x1.Domain)
		}
		got := map[string]string{}
		for _, disk := range x1.Domain.Devices.Disks {
			if disk.Source != nil && disk.Source.File != nil {
				got[disk.Target.Dev] = disk.Source.File.File
			} else {
				got[disk.Target.Dev] = ""
			}
		}
		if want := map[string]string{"vda": e.path("vda.qcow2"), "vdb": e.path("vdb.qcow2"), "hdc": ""}; fmt.Sprint(got) != fmt.Sprint(want) {
			t.Fatalf("XML of s1: domain disks %v, want %v", got, want)
		}

		x2 := e.parseSnapshotXML("s2")
		if x2.Parent == nil || x2.Parent.Name != "s1" || x2.State != "shutoff" {
			t.Fatalf("XML of s2: %+v", x2)
		}
		if x2.Disks == nil || len(x2.Disks.Disks) != 2 {
			t.Fatalf("XML of s2: disks %+v, want 2", x2.Disks)
		}
		for _, sd := range x2.Disks.Disks {
			if sd.Snapshot != "internal" || sd.Source != nil && sd.Source.File != nil && sd.Source.File.File != "" {
				t.Fatalf("XML of s2: disk %+v", sd)
			}
		}
		matched := 0
		for _, disk := range x2.Domain.Devices.Disks {
			if disk.Device == "disk" {
				if disk.Source.File.File != e.path(disk.Target.Dev+".s1") {
					t.Fatalf("XML of s2: domain disk %s on %s", disk.Target.Dev, disk.Source.File.File)
				}
				matched++
			}
		}
		if matched != 2 {
			t.Fatalf("XML of s2: %d domain disks, want 2", matched)
		}
		_, err = e.d.SnapshotGetXMLDesc(e.ctx, e.dom, "nope", 0)
		expectErr(t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)
		e.finish()
	})
}

// TestRedefine: libvirt's backup and restore of snapshot metadata:
// dumpxml, delete --metadata, then REDEFINE from that XML brings each
// snapshot back (parent, disks, description, the definition of its
// time), REDEFINE|CURRENT makes one current, and reverting to them
// brings their data back.
func TestRedefine(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		e.create("<domainsnapshot><name>s1</name><description>ext</description></domainsnapshot>", driver.CreateDiskOnly)
		e.write(1)
		e.snap("s2", 0) // internal, in vda.s1 and vdb.s1
		e.write(2)
		docs := map[string]string{}
		for _, n := range []string{"s1", "s2"} {
			doc, err := e.d.SnapshotGetXMLDesc(e.ctx, e.dom, n, 0)
			if err != nil {
				t.Fatal(err)
			}
			docs[n] = doc
		}
		saved := map[string]map[string]content{"s1": e.saved["s1"], "s2": e.saved["s2"]}
		recs := map[string]*driver.Snapshot{}
		for _, n := range []string{"s1", "s2"} {
			recs[n], _ = e.d.SnapshotLookupByName(e.ctx, e.dom, n, 0)
		}

		e.del("s1", driver.DeleteMetadataOnly|driver.DeleteChildren)
		e.expectList(0)
		e.expectChain("vda", "vda.s1", "vda.qcow2")
		e.expectInternalSnapshots("vda.s1", "s2")

		// Out of order: a parent that is not there yet (libvirt: invalid
		// argument).
		_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, docs["s2"], driver.CreateRedefine)
		expectErr(t, err, errdefs.ErrInvalidArg, driver.ErrNumInvalidArg)

		if _, err := e.d.SnapshotCreateXML(e.ctx, e.dom, docs["s1"], driver.CreateRedefine); err != nil {
			t.Fatalf("REDEFINE s1: %v", err)
		}
		e.saved["s1"] = saved["s1"]
		e.expectCurrent("")
		if _, err := e.d.SnapshotCreateXML(e.ctx, e.dom, docs["s2"], driver.CreateRedefine|driver.CreateCurrent); err != nil {
			t.Fatalf("REDEFINE|CURRENT s2: %v", err)
		}
		e.saved["s2"] = saved["s2"]
		e.expectCurrent("s2")
		e.expectParent("s2", "s1")
		e.expectList(driver.ListTopological, "s1", "s2")
		for _, n := range []string{"s1", "s2"} {
			got, err := e.d.SnapshotLookupByName(e.ctx, e.dom, n, 0)
			if err != nil {
				t.Fatal(err)
			}
			want := recs[n]
			if got.Description != want.Description || got.Parent != want.Parent || got.State != want.State ||
				!got.Created.Equal(want.Created) || fmt.Sprint(got.Disks) != fmt.Sprint(want.Disks) {
				t.Fatalf("redefined %s = %+v, was %+v", n, got, want)
			}
			if x := e.parseSnapshotXML(n); x.Domain == nil || x.Domain.Name != e.dom {
				t.Fatalf("redefined %s lost its domain definition", n)
			}
		}
		e.verify()

		// Redefining an existing snapshot updates it (virsh snapshot-edit).
		edited := e.parseSnapshotXML("s1")
		edited.Description = "edited"
		doc, err := edited.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := e.d.SnapshotCreateXML(e.ctx, e.dom, doc, driver.CreateRedefine); err != nil {
			t.Fatalf("REDEFINE an edited s1: %v", err)
		}
		if s, _ := e.d.SnapshotLookupByName(e.ctx, e.dom, "s1", 0); s == nil || s.Description != "edited" {
			t.Fatalf("edited s1 = %+v", s)
		}
		e.expectCurrent("s2")

		e.revert("s1", 0)
		e.expectChain("vda", "vda.s1-1", "vda.qcow2")
		e.write(3)
		e.revert("s2", 0)
		e.expectChain("vda", "vda.s1", "vda.qcow2")

		// What REDEFINE refuses, with libvirt's codes.
		const req = "<state>shutoff</state><creationTime>1700000000</creationTime>"
		for _, c := range []struct {
			doc      string
			flags    driver.CreateFlags
			sentinel error
			code     driver.ErrorNumber
		}{
			{"<domainsnapshot><description>no name</description>" + req + "</domainsnapshot>", driver.CreateRedefine, errdefs.ErrXML, driver.ErrNumXML},
			{"<domainsnapshot><name>x</name><state>shutoff</state><creationTime>yesterday</creationTime></domainsnapshot>", driver.CreateRedefine,
				errdefs.ErrInternal, driver.ErrNumInternal},
			{"<domainsnapshot><name>x</name", driver.CreateRedefine, errdefs.ErrXMLDetail, driver.ErrorNumber(errdefs.CodeXMLDetail)},
			{`<domainsnapshot><name>x</name>` + req + `<disks><disk name='vda' snapshot='external'><source file='` + e.path("nothere") + `'/></disk></disks></domainsnapshot>`,
				driver.CreateRedefine, driver.ErrInvalidArg, driver.ErrNumInvalidArg},
			{`<domainsnapshot><name>x</name>` + req + `<disks><disk name='vda' snapshot='internal'/></disks></domainsnapshot>`,
				driver.CreateRedefine, driver.ErrInvalidArg, driver.ErrNumInvalidArg},
			{`<domainsnapshot><name>x</name>` + req + `<disks><disk name='vdz' snapshot='no'/></disks></domainsnapshot>`,
				driver.CreateRedefine, errdefs.ErrUnsupported, driver.ErrNumConfigUnsupported},
			{`<domainsnapshot><name>s1</name>` + req + `<parent><name>s2</name></parent></domainsnapshot>`,
				driver.CreateRedefine, driver.ErrInvalidArg, driver.ErrNumInvalidArg},
		} {
			_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, c.doc, c.flags)
			expectErr(t, err, c.sentinel, c.code)
		}
		e.expectList(driver.ListTopological, "s1", "s2")
		e.expectParent("s1", "")
		e.del("s1", driver.DeleteChildren)
		e.finish()
	})
}

// TestRedefineForeignDomain: libvirt refuses to REDEFINE a snapshot whose
// <domain> is another domain's (virDomainSnapshotRedefineValidate:
// "definition for snapshot %s must use uuid %s", VIR_ERR_INVALID_ARG);
// reverting to such a snapshot would put the other domain's definition in
// place of this one's.
func TestRedefineForeignDomain(t *testing.T) {
	t.Parallel()
	for _, kind := range sources {
		t.Run(string(kind), func(t *testing.T) {
			t.Parallel()
			envs := newEnvs(t, kind, 2)
			a, b := envs[0], envs[1]
			a.write(0)
			a.snap("s1", driver.CreateDiskOnly)
			b.write(0)
			foreign := a.parseSnapshotXML("s1")
			foreign.Disks = nil // nothing of a's images: only the <domain> is foreign
			foreign.Parent = nil
			doc, err := foreign.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			_, err = b.d.SnapshotCreateXML(b.ctx, b.dom, doc, driver.CreateRedefine)
			if err == nil {
				// Show what it leads to, then report.
				rerr := b.d.RevertToSnapshot(b.ctx, b.dom, "s1", 0)
				var bName string
				if d, derr := b.d.DiskList(b.ctx, b.dom); derr != nil {
					bName = "DiskList of " + b.dom + " after the revert: " + derr.Error()
				} else {
					bName = fmt.Sprintf("DiskList of %s after the revert: %v", b.dom, d)
				}
				adef := a.definition()
				t.Fatalf("REDEFINE accepted into %s a snapshot whose <domain> is %s; revert: %v; %s; %s's definition now has vda on %s (storage: %s)",
					b.dom, foreign.Domain.Name, rerr, bName, a.dom, diskSource(adef, "vda"), a.chainOf("vda")[0])
			}
			expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
			b.expectList(0)
			a.finish()
			b.finish()
		})
	}
}

// diskSource is a disk's source file in a definition.
func diskSource(def *libvirtxml.Domain, target string) string {
	for _, disk := range def.Devices.Disks {
		if disk.Target != nil && disk.Target.Dev == target && disk.Source != nil && disk.Source.File != nil {
			return disk.Source.File.File
		}
	}
	return ""
}

package driver_test

import (
	"errors"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
)

// TestSnapshotView: the driver's Snapshot carries what libvirt's
// per-snapshot calls answer: Current (IsCurrent), Children by name as
// virsh orders them (ListAllChildren), Parent (GetParent), HasMetadata;
// calls returning one snapshot fill DomainXML, lists leave it out.
func TestSnapshotView(t *testing.T) {
	e := newAPIEnv(t)
	root := e.create("root", 0)
	if !root.Current || root.Parent != "" || len(root.Children) != 0 || !root.HasMetadata || root.DomainXML == "" {
		t.Fatalf("create's view: %+v", root)
	}
	want := []driver.SnapshotDisk{{Target: "vda", Mode: driver.DiskInternal, Image: e.path("vda.qcow2"), Format: "qcow2"}}
	if !reflect.DeepEqual(root.Disks, want) || root.State != "shutoff" || root.Created.Location() != time.UTC {
		t.Fatalf("create's view: disks %+v state %q created %v", root.Disks, root.State, root.Created)
	}
	// Byte order would put "B-child" first; virsh folds case.
	e.create("B-child", 0)
	e.revert("root")
	e.create("a-child", 0)

	got, err := e.d.SnapshotLookupByName(e.ctx, "vm", "root", 0)
	if err != nil {
		t.Fatal(err)
	}
	if got.Current || !reflect.DeepEqual(got.Children, []string{"a-child", "B-child"}) || !got.HasMetadata || got.DomainXML == "" {
		t.Fatalf("root: Current %v Children %q HasMetadata %v DomainXML %d bytes", got.Current, got.Children, got.HasMetadata, len(got.DomainXML))
	}
	cur, err := e.d.SnapshotCurrent(e.ctx, "vm", 0)
	if err != nil || cur.Name != "a-child" || !cur.Current || cur.Parent != "root" || cur.Children != nil || cur.DomainXML == "" {
		t.Fatalf("current: %+v %v", cur, err)
	}
	parent, err := e.d.SnapshotGetParent(e.ctx, "vm", "B-child", 0)
	if err != nil || parent.Name != "root" || parent.DomainXML == "" || len(parent.Children) != 2 {
		t.Fatalf("parent of B-child: %+v %v", parent, err)
	}
	list, err := e.d.ListAllSnapshots(e.ctx, "vm", 0)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range list {
		names = append(names, s.Name)
		if s.DomainXML != "" || s.Current != (s.Name == "a-child") || !s.HasMetadata {
			t.Errorf("listed %s: Current %v, HasMetadata %v, DomainXML %d bytes", s.Name, s.Current, s.HasMetadata, len(s.DomainXML))
		}
	}
	if !reflect.DeepEqual(names, []string{"root", "B-child", "a-child"}) {
		t.Fatalf("list order %q, want creation order", names)
	}
	kids, err := e.d.SnapshotListAllChildren(e.ctx, "vm", "root", 0)
	if err != nil || len(kids) != 2 || kids[0].Name != "B-child" || kids[1].Children != nil {
		t.Fatalf("children of root: %+v %v", kids, err)
	}

	// A snapshot taken without metadata says so, and no call names it.
	loose, err := e.d.CreateSnapshot(e.ctx, "vm", driver.SnapshotRequest{Name: "loose"}, driver.CreateNoMetadata)
	if err != nil {
		t.Fatal(err)
	}
	if loose.HasMetadata || loose.Current || loose.Name != "loose" {
		t.Fatalf("no-metadata view: %+v", loose)
	}
	if _, err := e.d.SnapshotLookupByName(e.ctx, "vm", "loose", 0); !errors.Is(err, driver.ErrNoSnapshot) {
		t.Fatalf("looking up the no-metadata snapshot: %v", err)
	}
	// Lookups take no flags yet, as in libvirt; the bit is named.
	if _, err := e.d.SnapshotLookupByName(e.ctx, "vm", "root", 1<<3); !errors.Is(err, driver.ErrInvalidArg) ||
		err.Error() != "unsupported flags (0x8) in function SnapshotLookupByName" {
		t.Fatalf("a flag on a lookup: %v", err)
	}
	if _, err := e.d.SnapshotGetXMLDesc(e.ctx, "vm", "root", driver.XMLSecure|1<<1); !errors.Is(err, driver.ErrInvalidArg) {
		t.Fatalf("an unknown XML flag: %v", err)
	}
}

// TestTree: roots and siblings keep the list's order; a snapshot whose
// parent is not listed is a root.
func TestTree(t *testing.T) {
	snap := func(name, parent string) *driver.Snapshot { return &driver.Snapshot{Name: name, Parent: parent} }
	list := []*driver.Snapshot{snap("b", "a"), snap("a", ""), snap("c", "a"), snap("d", "c"), snap("e", "gone"), snap("f", "")}
	var render func(nodes []*driver.TreeNode) []any
	render = func(nodes []*driver.TreeNode) []any {
		out := []any{}
		for _, n := range nodes {
			out = append(out, n.Snapshot.Name, render(n.Children))
		}
		return out
	}
	got := render(driver.Tree(list))
	want := []any{"a", []any{"b", []any{}, "c", []any{"d", []any{}}}, "e", []any{}, "f", []any{}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("Tree: %v, want %v", got, want)
	}
	if got := driver.Tree(nil); len(got) != 0 {
		t.Fatalf("Tree(nil): %v", got)
	}
}

// TestSortByName: virsh's name order folds ASCII case only, and names
// equal but for case keep the list's order.
func TestSortByName(t *testing.T) {
	var list []*driver.Snapshot
	for _, name := range []string{"b", "a", "É", "B", "A", "é", "_"} {
		list = append(list, &driver.Snapshot{Name: name})
	}
	driver.SortByName(list)
	var got []string
	for _, s := range list {
		got = append(got, s.Name)
	}
	if want := []string{"_", "a", "A", "b", "B", "É", "é"}; !slices.Equal(got, want) {
		t.Fatalf("SortByName: %v, want %v", got, want)
	}
}

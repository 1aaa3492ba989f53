package driver_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// apiEnv is a folder source with one shut-off domain, vm, whose one disk
// vda is pool/vda.qcow2.
type apiEnv struct {
	t    *testing.T
	ctx  context.Context
	d    *driver.Driver
	pool string
}

func newAPIEnv(t *testing.T) *apiEnv {
	t.Helper()
	pool, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(pool, "vda.qcow2"), "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	d := openVM(t, pool, "0c4b2a51-7d3e-4f60-8a19-5e2f3b4c6d70", "vda.qcow2")
	return &apiEnv{t: t, ctx: context.Background(), d: d, pool: pool}
}

// openVM opens a driver on a folder source that defines one shut-off Xen
// domain, vm, with uuid, whose disks vda, vdb, ... are the qcow2 images
// named images in pool, pool being the storage pool.
func openVM(t *testing.T, pool, uuid string, images ...string) *driver.Driver {
	t.Helper()
	var disks strings.Builder
	for i, img := range images {
		fmt.Fprintf(&disks, "    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='vd%c' bus='xen'/></disk>\n", filepath.Join(pool, img), 'a'+i)
	}
	doc := `<domain type='xen'>
  <name>vm</name>
  <uuid>` + uuid + `</uuid>
  <memory unit='KiB'>262144</memory>
  <os><type>xen</type></os>
  <devices>
` + disks.String() + `  </devices>
</domain>
`
	defs := t.TempDir()
	if err := os.WriteFile(filepath.Join(defs, "vm.xml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := driver.NewDirSource(defs)
	if err != nil {
		t.Fatal(err)
	}
	d, err := driver.Open(context.Background(), driver.Config{StateDir: t.TempDir(), Source: src, Pools: []string{pool}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func (e *apiEnv) path(name string) string { return filepath.Join(e.pool, name) }

// create takes a snapshot named name with flags; it must succeed.
func (e *apiEnv) create(name string, flags driver.CreateFlags) *driver.Snapshot {
	e.t.Helper()
	s, err := e.d.CreateSnapshot(e.ctx, "vm", driver.SnapshotRequest{Name: name}, flags)
	if err != nil {
		e.t.Fatalf("create %s: %v", name, err)
	}
	return s
}

func (e *apiEnv) revert(name string) {
	e.t.Helper()
	if err := e.d.RevertToSnapshot(e.ctx, "vm", name, 0); err != nil {
		e.t.Fatalf("revert %s: %v", name, err)
	}
}

// setCurrent does what virsh's snapshot-current DOMAIN NAME does: the
// snapshot's own XML redefined with REDEFINE|CURRENT.
func (e *apiEnv) setCurrent(name string) (*driver.Snapshot, error) {
	doc, err := e.d.SnapshotGetXMLDesc(e.ctx, "vm", name, driver.XMLSecure)
	if err != nil {
		return nil, err
	}
	return e.d.SnapshotCreateXML(e.ctx, "vm", doc, driver.CreateRedefine|driver.CreateCurrent)
}

// chain is the active chain of vda, top to base.
func (e *apiEnv) chain() []string {
	e.t.Helper()
	disks, err := e.d.DiskList(e.ctx, "vm")
	if err != nil || len(disks) != 1 {
		e.t.Fatalf("DiskList: %v %+v", err, disks)
	}
	return disks[0].Chain
}

func (e *apiEnv) paths(names ...string) []string {
	var out []string
	for _, n := range names {
		out = append(out, e.path(n))
	}
	return out
}

// TestSetCurrentAfterRevertElsewhere: virsh's snapshot-current DOMAIN
// NAME redefines the snapshot's own XML with REDEFINE|CURRENT. libvirt
// accepts that for any existing snapshot whose document is unchanged,
// wherever the disks are now; xlsnap refused it ("invalid argument")
// once the snapshot's images had left the disk's chain: after a revert
// to an internal snapshot (copied out to a new image) and after a revert
// to another branch (which discards the overlay the other was taken on).
func TestSetCurrentAfterRevertElsewhere(t *testing.T) {
	e := newAPIEnv(t)
	recorded := map[string][]driver.SnapshotDisk{}
	record := func(n string) {
		s, err := e.d.SnapshotLookupByName(e.ctx, "vm", n, 0)
		if err != nil {
			t.Fatal(err)
		}
		recorded[n] = s.Disks
	}
	// setCurrent makes each snapshot current in turn, the disks where
	// they are; each keeps the images it recorded.
	setCurrent := func(names ...string) {
		t.Helper()
		for _, n := range names {
			s, err := e.setCurrent(n)
			if err != nil {
				t.Fatalf("snapshot-current %s (chain %v): %v", n, e.chain(), err)
			}
			if !s.Current || s.Name != n {
				t.Fatalf("snapshot-current %s returned %s, Current %v", n, s.Name, s.Current)
			}
			cur, err := e.d.SnapshotCurrent(e.ctx, "vm", 0)
			if err != nil || cur.Name != n {
				t.Fatalf("current after snapshot-current %s: %v %v", n, cur, err)
			}
			if !reflect.DeepEqual(cur.Disks, recorded[n]) {
				t.Fatalf("snapshot-current %s changed its disks: %+v, recorded %+v", n, cur.Disks, recorded[n])
			}
		}
	}
	e.create("s1", 0)                     // internal, in vda.qcow2
	e.create("s2", driver.CreateDiskOnly) // external: vda.s2 on vda.qcow2
	record("s1")
	record("s2")
	e.revert("s1") // s1 copied out: the chain holds neither vda.qcow2 nor vda.s2
	if c := e.chain(); slices.Contains(c, recorded["s1"][0].Image) || slices.Contains(c, recorded["s2"][0].Overlay) {
		t.Fatalf("the revert to s1 left its image or s2's overlay in the chain %v", c)
	}
	setCurrent("s1", "s2")

	e.create("s3", driver.CreateDiskOnly)
	record("s3")
	e.revert("s2") // another branch: s3's overlay is discarded
	if c := e.chain(); slices.Contains(c, recorded["s3"][0].Overlay) {
		t.Fatalf("the revert to s2 left s3's overlay in the chain %v", c)
	}
	setCurrent("s3", "s1", "s2")

	// The images it kept are the ones a revert uses.
	e.revert("s1")
	e.revert("s3")

	// A document that names other images than the record is still
	// checked against the chain: a new overlay no chain has is refused.
	doc, err := e.d.SnapshotGetXMLDesc(e.ctx, "vm", "s3", 0)
	if err != nil {
		t.Fatal(err)
	}
	moved := strings.Replace(doc, recorded["s3"][0].Overlay, e.path("elsewhere.qcow2"), 1)
	if moved == doc {
		t.Fatalf("s3's XML does not name its overlay %s:\n%s", recorded["s3"][0].Overlay, doc)
	}
	_, err = e.d.SnapshotCreateXML(e.ctx, "vm", moved, driver.CreateRedefine|driver.CreateCurrent)
	if !errors.Is(err, driver.ErrInvalidArg) || driver.Code(err) != driver.ErrNumInvalidArg {
		t.Fatalf("redefining s3 on an unknown overlay: %v, want ErrInvalidArg (8)", err)
	}
}

// TestCreateSnapshotRefusesRedefine: the typed request has no creation
// time, state or domain definition, which REDEFINE requires; it says to
// use SnapshotCreateXML and changes nothing.
func TestCreateSnapshotRefusesRedefine(t *testing.T) {
	e := newAPIEnv(t)
	e.create("s1", 0)
	for _, flags := range []driver.CreateFlags{driver.CreateRedefine, driver.CreateRedefine | driver.CreateCurrent} {
		_, err := e.d.CreateSnapshot(e.ctx, "vm", driver.SnapshotRequest{Name: "s1"}, flags)
		if !errors.Is(err, driver.ErrInvalidArg) || driver.Code(err) != driver.ErrNumInvalidArg || !strings.Contains(err.Error(), "use SnapshotCreateXML") {
			t.Fatalf("flags %#x: %v, want ErrInvalidArg naming SnapshotCreateXML", flags, err)
		}
	}
	// CURRENT alone is libvirt's required-flag error, before that one.
	_, err := e.d.CreateSnapshot(e.ctx, "vm", driver.SnapshotRequest{Name: "s2"}, driver.CreateCurrent)
	if !errors.Is(err, driver.ErrInvalidArg) || !strings.Contains(err.Error(), "VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE' is required") {
		t.Fatalf("CURRENT alone: %v", err)
	}
	list, err := e.d.ListAllSnapshots(e.ctx, "vm", 0)
	if err != nil || len(list) != 1 || list[0].Name != "s1" || !list[0].Current {
		t.Fatalf("after the refusals: %v %+v", err, list)
	}
}

// TestRedefineExistingChecksItself: as libvirt, a redefine of an
// existing snapshot is checked against that snapshot: a document without
// <domain> keeps the recorded definition (a revert needs it), and one
// that moves the snapshot between offline and online, or between full
// system and disk-only, is ErrInvalidArg.
func TestRedefineExistingChecksItself(t *testing.T) {
	e := newAPIEnv(t)
	e.create("s1", 0)
	before, err := e.d.SnapshotLookupByName(e.ctx, "vm", "s1", 0)
	if err != nil || before.DomainXML == "" {
		t.Fatalf("s1: %v, DomainXML %q", err, before.DomainXML)
	}
	doc, err := e.d.SnapshotGetXMLDesc(e.ctx, "vm", "s1", 0)
	if err != nil {
		t.Fatal(err)
	}
	i, j := strings.Index(doc, "<domain "), strings.LastIndex(doc, "</domain>")
	if i < 0 || j < i {
		t.Fatalf("no <domain> in s1's XML:\n%s", doc)
	}
	bare := doc[:i] + doc[j+len("</domain>"):]
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", bare, driver.CreateRedefine); err != nil {
		t.Fatalf("redefining s1 without <domain>: %v", err)
	}
	after, err := e.d.SnapshotLookupByName(e.ctx, "vm", "s1", 0)
	if err != nil || after.DomainXML != before.DomainXML {
		t.Fatalf("s1's definition after a redefine without <domain>: %v\n%s\nwant\n%s", err, after.DomainXML, before.DomainXML)
	}
	e.revert("s1")

	for state, want := range map[string]string{
		"running":       "cannot change between online and offline snapshot state in snapshot s1",
		"disk-snapshot": "cannot change between disk only and full system in snapshot s1",
	} {
		changed := strings.Replace(bare, "<state>shutoff</state>", "<state>"+state+"</state>", 1)
		if changed == bare {
			t.Fatalf("no shutoff state in s1's XML:\n%s", bare)
		}
		_, err := e.d.SnapshotCreateXML(e.ctx, "vm", changed, driver.CreateRedefine)
		if !errors.Is(err, driver.ErrInvalidArg) || !strings.Contains(err.Error(), want) {
			t.Errorf("redefining s1 as %s: %v, want ErrInvalidArg %q", state, err, want)
		}
	}
	if s, err := e.d.SnapshotLookupByName(e.ctx, "vm", "s1", 0); err != nil || s.State != "shutoff" {
		t.Fatalf("s1 after the refused redefines: %+v %v", s, err)
	}
}

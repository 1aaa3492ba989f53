// Package integration runs xlsnap's driver end to end: real qemu-img and
// qemu-io on real images, and both domain sources (a folder of domain XML
// files, and libvirt's own test driver through libvirt.org/go/libvirt).
//
// Every scenario keeps a model of what each disk holds and what each
// snapshot holds; after every operation it reads the data back through
// the domain's definition (what a hypervisor would open) and through each
// remaining snapshot's recorded image, and compares the chains the
// definition, storage's records, DiskList and the images on disk name.
package integration

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync/atomic"
	"testing"

	"libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// Each disk is 16 MiB; the tests write and read nRegions regions of
// regionLen bytes, one MiB apart.
const (
	diskSize  = "16M"
	regionLen = 64 << 10
	nRegions  = 4
)

func regionOff(r int) int { return r << 20 }

// content is what a disk reads in each region (0: zeros).
type content [nRegions]byte

// sourceKind names a domain source.
type sourceKind string

const (
	dirSource     sourceKind = "dir"
	libvirtSource sourceKind = "libvirt"
)

var sources = []sourceKind{dirSource, libvirtSource}

// diskDef is one disk of a test domain; Snapshot is its own
// snapshot="..." attribute ("" for none).
type diskDef struct {
	Target   string
	Snapshot string
}

var twoDisks = []diskDef{{Target: "vda"}, {Target: "vdb"}}

// both runs fn against each domain source in parallel subtests.
func both(t *testing.T, disks []diskDef, fn func(t *testing.T, e *env)) {
	t.Helper()
	t.Parallel()
	for _, k := range sources {
		t.Run(string(k), func(t *testing.T) {
			t.Parallel()
			fn(t, newEnv(t, k, disks...))
		})
	}
}

// env is one test's world: a pool of images, a domain defined in one
// source, a driver, and the model of what every disk and snapshot holds.
type env struct {
	t    *testing.T
	ctx  context.Context
	kind sourceKind
	pool string
	dom  string
	d    *driver.Driver

	defDir string                // dir source: the folder of NAME.xml
	lv     *libvirtsource.Source // libvirt source

	disks []string
	seq   int
	now   map[string]content            // disk → what it reads now
	saved map[string]map[string]content // snapshot → disk → what it holds
}

var domainSeq atomic.Int64

// domainName is unique in the process: test:///default is one state
// shared by every connection of the process while any is open.
func domainName(t *testing.T) string {
	clean := regexp.MustCompile(`[^A-Za-z0-9_.]+`).ReplaceAllString(t.Name(), "_")
	return fmt.Sprintf("xl_%s_%d", clean, domainSeq.Add(1))
}

func newEnv(t *testing.T, kind sourceKind, disks ...diskDef) *env {
	t.Helper()
	return newEnvs(t, kind, 1, disks...)[0]
}

// newEnvs defines n domains in one source, each with its own pool, and
// opens one driver over them all.
func newEnvs(t *testing.T, kind sourceKind, n int, disks ...diskDef) []*env {
	t.Helper()
	if len(disks) == 0 {
		disks = twoDisks
	}
	var (
		src    driver.DomainSource
		defDir string
		ls     *libvirtsource.Source
		err    error
	)
	switch kind {
	case dirSource:
		defDir = t.TempDir()
		if src, err = driver.NewDirSource(defDir); err != nil {
			t.Fatal(err)
		}
	case libvirtSource:
		if ls, err = libvirtsource.Open("test:///default"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ls.Close() })
		src = ls
	}
	var envs []*env
	var pools []string
	for range n {
		pool, err := filepath.EvalSymlinks(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		e := &env{t: t, ctx: context.Background(), kind: kind, pool: pool, dom: domainName(t), defDir: defDir, lv: ls,
			now: map[string]content{}, saved: map[string]map[string]content{}}
		for _, dk := range disks {
			e.disks = append(e.disks, dk.Target)
			run(t, "qemu-img", "create", "-q", "-f", "qcow2", e.path(dk.Target+".qcow2"), diskSize)
		}
		doc := domainXML(e.dom, pool, disks)
		switch kind {
		case dirSource:
			if err := os.WriteFile(filepath.Join(defDir, e.dom+".xml"), []byte(doc), 0o644); err != nil {
				t.Fatal(err)
			}
		case libvirtSource:
			dom, err := ls.Conn().DomainDefineXML(doc)
			if err != nil {
				t.Fatalf("DomainDefineXML: %v", err)
			}
			dom.Free()
			t.Cleanup(func() {
				if dom, err := ls.Conn().LookupDomainByName(e.dom); err == nil {
					if active, _ := dom.IsActive(); active {
						dom.Destroy()
					}
					dom.Undefine()
					dom.Free()
				}
			})
		}
		envs = append(envs, e)
		pools = append(pools, pool)
	}
	d, err := driver.Open(context.Background(), driver.Config{StateDir: t.TempDir(), Source: src, Pools: pools})
	if err != nil {
		t.Fatalf("driver.Open: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	for _, e := range envs {
		e.d = d
	}
	return envs
}

// domainXML is a persistent domain of libvirt's test driver with one
// qcow2 file disk per diskDef, plus an empty cdrom the driver must leave
// alone.
func domainXML(name, pool string, disks []diskDef) string {
	var b strings.Builder
	fmt.Fprintf(&b, "<domain type='test'>\n  <name>%s</name>\n  <memory unit='MiB'>64</memory>\n", name)
	b.WriteString("  <os>\n    <type>hvm</type>\n  </os>\n  <devices>\n")
	for _, dk := range disks {
		attr := ""
		if dk.Snapshot != "" {
			attr = fmt.Sprintf(" snapshot='%s'", dk.Snapshot)
		}
		fmt.Fprintf(&b, "    <disk type='file' device='disk'%s>\n", attr)
		b.WriteString("      <driver name='qemu' type='qcow2'/>\n")
		fmt.Fprintf(&b, "      <source file='%s'/>\n", filepath.Join(pool, dk.Target+".qcow2"))
		fmt.Fprintf(&b, "      <target dev='%s' bus='virtio'/>\n    </disk>\n", dk.Target)
	}
	b.WriteString("    <disk type='file' device='cdrom'>\n      <target dev='hdc' bus='ide'/>\n      <readonly/>\n    </disk>\n")
	b.WriteString("  </devices>\n</domain>\n")
	return b.String()
}

// path is a file name in the pool.
func (e *env) path(name string) string { return filepath.Join(e.pool, name) }

// run runs a command and fails the test with its output on error.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// definitionXML is the domain's persistent definition as its source
// holds it now, read without going through the driver.
func (e *env) definitionXML() string {
	e.t.Helper()
	switch e.kind {
	case dirSource:
		b, err := os.ReadFile(filepath.Join(e.defDir, e.dom+".xml"))
		if err != nil {
			e.t.Fatal(err)
		}
		return string(b)
	default:
		dom, err := e.lv.Conn().LookupDomainByName(e.dom)
		if err != nil {
			e.t.Fatal(err)
		}
		defer dom.Free()
		doc, err := dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE)
		if err != nil {
			e.t.Fatal(err)
		}
		return doc
	}
}

func (e *env) definition() *libvirtxml.Domain {
	e.t.Helper()
	var d libvirtxml.Domain
	if err := d.Unmarshal(e.definitionXML()); err != nil {
		e.t.Fatalf("the definition does not parse: %v", err)
	}
	if d.Name != e.dom {
		e.t.Fatalf("the definition names domain %q, want %q", d.Name, e.dom)
	}
	return &d
}

// defDisk is a disk's source file and format in the definition now.
func (e *env) defDisk(target string) (file, format string) {
	e.t.Helper()
	def := e.definition()
	for _, disk := range def.Devices.Disks {
		if disk.Target == nil || disk.Target.Dev != target {
			continue
		}
		if disk.Source == nil || disk.Source.File == nil || disk.Driver == nil {
			e.t.Fatalf("disk %s of the definition has no file source or driver", target)
		}
		if f := disk.Source.File.File; e.kind == dirSource && !filepath.IsAbs(f) {
			return filepath.Join(e.defDir, f), disk.Driver.Type // relative to the XML's folder
		}
		return disk.Source.File.File, disk.Driver.Type
	}
	e.t.Fatalf("the definition has no disk %s", target)
	return "", ""
}

// write writes a fresh pattern over region r of every disk, through the
// definition's source (what the guest would write to).
func (e *env) write(r int) {
	e.t.Helper()
	e.seq++
	for i, disk := range e.disks {
		e.writeDisk(disk, r, byte((i+1)<<6|e.seq))
	}
}

func (e *env) writeDisk(disk string, r int, pattern byte) {
	e.t.Helper()
	file, format := e.defDisk(disk)
	run(e.t, "qemu-io", "-f", format, "-c", fmt.Sprintf("write -P 0x%02x %d %d", pattern, regionOff(r), regionLen), file)
	c := e.now[disk]
	c[r] = pattern
	e.now[disk] = c
}

// expectData reads every region of every disk back through the
// definition's source.
func (e *env) expectData() {
	e.t.Helper()
	for _, disk := range e.disks {
		file, format := e.defDisk(disk)
		expectRegions(e.t, file, format, e.now[disk])
	}
}

// expectSnapshotData reads every remaining snapshot's data back from the
// images its record names: an external disk's state image, an internal
// disk's internal snapshot (through qemu-img convert -l).
func (e *env) expectSnapshotData() {
	e.t.Helper()
	for name, disks := range e.saved {
		s, err := e.d.SnapshotLookupByName(e.ctx, e.dom, name, 0)
		if err != nil {
			e.t.Fatalf("snapshot %s: %v", name, err)
		}
		for disk, want := range disks {
			sd := s.Disk(disk)
			if sd == nil {
				e.t.Fatalf("snapshot %s has no record of disk %s", name, disk)
			}
			switch sd.Mode {
			case driver.DiskExternal:
				expectRegions(e.t, sd.Image, sd.Format, want)
			case driver.DiskInternal:
				expectInternal(e.t, sd.Image, sd.Format, name, want)
			default:
				e.t.Fatalf("snapshot %s, disk %s: mode %q in the record, the model has data", name, disk, sd.Mode)
			}
		}
	}
}

// expectRegions asserts what an image reads (through its backing chain)
// in every region: storagetest.ExpectImage's check, with the regions read
// by one qemu-io process.
func expectRegions(t *testing.T, path, format string, want content) {
	t.Helper()
	args := []string{"-r", "-f", format}
	for r, p := range want {
		args = append(args, "-c", fmt.Sprintf("read -P 0x%02x %d %d", p, regionOff(r), regionLen))
	}
	out, err := exec.Command("qemu-io", append(args, path)...).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") || strings.Contains(string(out), "error") {
		// Name the region that differs.
		for r, p := range want {
			storagetest.ExpectImage(t, path, format, p, regionOff(r), regionLen)
		}
		t.Fatalf("%s: want %x: %v\n%s", path, want, err, out)
	}
}

// expectInternal reads an internal snapshot's content (through the
// image's backing chain) by converting it to a raw file.
func expectInternal(t *testing.T, path, format, snap string, want content) {
	t.Helper()
	out := filepath.Join(t.TempDir(), "internal.raw")
	run(t, "qemu-img", "convert", "-f", format, "-O", "raw", "-l", "snapshot.name="+snap, path, out)
	f, err := os.Open(out)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	defer os.Remove(out)
	buf := make([]byte, regionLen)
	for r, p := range want {
		if _, err := f.ReadAt(buf, int64(regionOff(r))); err != nil {
			t.Fatal(err)
		}
		for i, b := range buf {
			if b != p {
				t.Fatalf("internal snapshot %s of %s, region %d: byte %d is 0x%02x, want 0x%02x", snap, path, r, i, b, p)
			}
		}
	}
}

// verify is what every step ends with: the definition agrees with
// storage, every disk reads what it must, every snapshot holds what it
// must.
func (e *env) verify() {
	e.t.Helper()
	e.expectDefinitionSynced()
	e.expectData()
	e.expectSnapshotData()
}

// expectDefinitionSynced asserts that the definition, read straight from
// its source, points each disk at storage's active layer in qcow2.
func (e *env) expectDefinitionSynced() {
	e.t.Helper()
	rec, err := e.d.Storage().Domain(e.ctx, e.key())
	if err != nil {
		e.t.Fatal(err)
	}
	for _, disk := range e.disks {
		file, format := e.defDisk(disk)
		rd := rec.Disk(disk)
		if rd == nil {
			e.t.Fatalf("storage has no disk %s", disk)
		}
		if file != rd.Active || format != rd.Format {
			e.t.Fatalf("definition has %s on %s (%s), storage on %s (%s)", disk, file, format, rd.Active, rd.Format)
		}
	}
}

// create is SnapshotCreateXML that must succeed; it records in the model
// what the snapshot holds.
func (e *env) create(doc string, flags driver.CreateFlags) *driver.Snapshot {
	e.t.Helper()
	s, err := e.d.SnapshotCreateXML(e.ctx, e.dom, doc, flags)
	if err != nil {
		e.t.Fatalf("SnapshotCreateXML(%s, %#x): %v", doc, flags, err)
	}
	e.taken(s, flags)
	return s
}

// taken records a new snapshot's data in the model.
func (e *env) taken(s *driver.Snapshot, flags driver.CreateFlags) {
	if flags&driver.CreateNoMetadata != 0 {
		return
	}
	m := map[string]content{}
	for _, sd := range s.Disks {
		if sd.Mode != driver.DiskNone {
			m[sd.Target] = e.now[sd.Target]
		}
	}
	e.saved[s.Name] = m
}

// snap takes a snapshot with only a name.
func (e *env) snap(name string, flags driver.CreateFlags) *driver.Snapshot {
	e.t.Helper()
	return e.create(snapXML(name), flags)
}

func snapXML(name string) string {
	return "<domainsnapshot><name>" + name + "</name></domainsnapshot>"
}

// revert reverts and checks that every disk the snapshot covers reads
// what it held, and the others what they read before.
func (e *env) revert(name string, flags driver.RevertFlags) {
	e.t.Helper()
	if err := e.d.RevertToSnapshot(e.ctx, e.dom, name, flags); err != nil {
		e.t.Fatalf("RevertToSnapshot(%s, %#x): %v", name, flags, err)
	}
	for disk, c := range e.saved[name] {
		e.now[disk] = c
	}
	e.verify()
	e.expectCurrent(name)
}

// del deletes and checks that nothing any disk or snapshot reads changed.
func (e *env) del(name string, flags driver.DeleteFlags) *driver.DeleteReport {
	e.t.Helper()
	rep, err := e.d.SnapshotDelete(e.ctx, e.dom, name, flags)
	if err != nil {
		e.t.Fatalf("SnapshotDelete(%s, %#x): %v", name, flags, err)
	}
	for _, n := range rep.Deleted {
		delete(e.saved, n)
	}
	e.verify()
	return rep
}

// action is what a delete report says it did to one disk of a snapshot.
func action(rep *driver.DeleteReport, snap, disk string) driver.DiskAction {
	for _, r := range rep.Disks {
		if r.Snapshot == snap && r.Disk == disk {
			return r.Action
		}
	}
	return ""
}

// chainOnDisk is the chain qemu-img reads from path, as file names; it
// also asserts every backing reference names its format.
func chainOnDisk(t *testing.T, path string) []string {
	t.Helper()
	out := run(t, "qemu-img", "info", "--output=json", "--backing-chain", "-f", "qcow2", path)
	var layers []struct {
		Filename       string `json:"filename"`
		Format         string `json:"format"`
		BackingFile    string `json:"backing-filename"`
		BackingFormat  string `json:"backing-filename-format"`
		FullBackingRef string `json:"full-backing-filename"`
	}
	if err := json.Unmarshal([]byte(out), &layers); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	var names []string
	for _, l := range layers {
		if l.Format != "qcow2" {
			t.Fatalf("%s is %s, want qcow2", l.Filename, l.Format)
		}
		if l.BackingFile != "" && l.BackingFormat == "" {
			t.Fatalf("%s names its backing file %s without a format", l.Filename, l.BackingFile)
		}
		names = append(names, filepath.Base(l.Filename))
	}
	return names
}

// expectChain asserts a disk's chain, top to base, as file names in the
// pool, four ways: the definition's source, storage's record, DiskList,
// and the images on disk.
func (e *env) expectChain(disk string, want ...string) {
	e.t.Helper()
	file, format := e.defDisk(disk)
	if file != e.path(want[0]) || format != "qcow2" {
		e.t.Fatalf("definition: disk %s on %s (%s), want %s (qcow2)", disk, file, format, e.path(want[0]))
	}
	rec, err := e.d.Storage().Domain(e.ctx, e.key())
	if err != nil {
		e.t.Fatal(err)
	}
	var recorded []string
	for _, p := range rec.Chain(rec.Disk(disk).Active) {
		recorded = append(recorded, filepath.Base(p))
	}
	if !slices.Equal(recorded, want) {
		e.t.Fatalf("storage's record of %s: chain %v, want %v", disk, recorded, want)
	}
	list, err := e.d.DiskList(e.ctx, e.dom)
	if err != nil {
		e.t.Fatal(err)
	}
	var wantPaths []string
	for _, w := range want {
		wantPaths = append(wantPaths, e.path(w))
	}
	found := false
	for _, di := range list {
		if di.Target != disk {
			continue
		}
		found = true
		if di.Source != wantPaths[0] || di.Format != "qcow2" || !slices.Equal(di.Chain, wantPaths) {
			e.t.Fatalf("DiskList %s: source %s (%s) chain %v, want %v", disk, di.Source, di.Format, di.Chain, wantPaths)
		}
	}
	if !found {
		e.t.Fatalf("DiskList has no disk %s: %+v", disk, list)
	}
	if got := chainOnDisk(e.t, e.path(want[0])); !slices.Equal(got, want) {
		e.t.Fatalf("on disk, %s's chain is %v, want %v", disk, got, want)
	}
}

// expectSnapshots asserts the names ListAllSnapshots returns with flags,
// in order.
func (e *env) expectList(flags driver.ListFlags, want ...string) {
	e.t.Helper()
	list, err := e.d.ListAllSnapshots(e.ctx, e.dom, flags)
	if err != nil {
		e.t.Fatalf("ListAllSnapshots(%#x): %v", flags, err)
	}
	if got := names(list); !slices.Equal(got, want) {
		e.t.Fatalf("ListAllSnapshots(%#x) = %v, want %v", flags, got, want)
	}
}

// expectSet is expectList without the order.
func (e *env) expectSet(flags driver.ListFlags, want ...string) {
	e.t.Helper()
	list, err := e.d.ListAllSnapshots(e.ctx, e.dom, flags)
	if err != nil {
		e.t.Fatalf("ListAllSnapshots(%#x): %v", flags, err)
	}
	got := names(list)
	sort.Strings(got)
	want = slices.Clone(want)
	sort.Strings(want)
	if !slices.Equal(got, want) {
		e.t.Fatalf("ListAllSnapshots(%#x) = %v, want (any order) %v", flags, got, want)
	}
}

func names(list []*driver.Snapshot) []string {
	out := []string{}
	for _, s := range list {
		out = append(out, s.Name)
	}
	return out
}

// expectCurrent asserts the current snapshot ("" for none) through
// SnapshotCurrent and SnapshotIsCurrent.
func (e *env) expectCurrent(name string) {
	e.t.Helper()
	cur, err := e.d.SnapshotCurrent(e.ctx, e.dom, 0)
	if name == "" {
		expectErr(e.t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)
		return
	}
	if err != nil {
		e.t.Fatalf("SnapshotCurrent: %v", err)
	}
	if cur.Name != name {
		e.t.Fatalf("current snapshot %s, want %s", cur.Name, name)
	}
	for s := range e.saved {
		is, err := e.d.SnapshotIsCurrent(e.ctx, e.dom, s, 0)
		if err != nil {
			e.t.Fatalf("SnapshotIsCurrent(%s): %v", s, err)
		}
		if is != (s == name) {
			e.t.Fatalf("SnapshotIsCurrent(%s) = %v with %s current", s, is, name)
		}
	}
}

// expectParent asserts a snapshot's parent ("" for a root).
func (e *env) expectParent(name, parent string) {
	e.t.Helper()
	p, err := e.d.SnapshotGetParent(e.ctx, e.dom, name, 0)
	if parent == "" {
		expectErr(e.t, err, driver.ErrNoSnapshot, driver.ErrNumNoDomainSnapshot)
		return
	}
	if err != nil {
		e.t.Fatalf("SnapshotGetParent(%s): %v", name, err)
	}
	if p.Name != parent {
		e.t.Fatalf("parent of %s is %s, want %s", name, p.Name, parent)
	}
}

// expectErr asserts an error's sentinel and its libvirt code. While
// storage's sentinels move to errdefs (issue #12), the driver's own
// refusals wrap errdefs' sentinel of the same code: either is taken.
func expectErr(t *testing.T, err, sentinel error, code driver.ErrorNumber) {
	t.Helper()
	if err == nil {
		t.Fatalf("no error, want %v (code %d)", sentinel, code)
	}
	var de *errdefs.Error
	if sentinel != nil && !errors.Is(err, sentinel) && !(errors.As(err, &de) && de.LibvirtCode() == int(code)) {
		t.Fatalf("error %q (%T) is not %v", err, err, sentinel)
	}
	if got := driver.Code(err); got != code {
		t.Fatalf("error %q has code %d, want %d", err, got, code)
	}
}

// internalSnapshots lists the internal snapshots qemu-img sees in an image.
func internalSnapshots(t *testing.T, path string) []string {
	t.Helper()
	out := run(t, "qemu-img", "info", "--output=json", "-f", "qcow2", path)
	var info struct {
		Snapshots []struct {
			Name string `json:"name"`
		} `json:"snapshots"`
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatal(err)
	}
	got := []string{}
	for _, s := range info.Snapshots {
		got = append(got, s.Name)
	}
	sort.Strings(got)
	return got
}

func (e *env) expectInternalSnapshots(image string, want ...string) {
	e.t.Helper()
	if want == nil {
		want = []string{}
	}
	if got := internalSnapshots(e.t, e.path(image)); !slices.Equal(got, want) {
		e.t.Fatalf("internal snapshots of %s: %v, want %v", image, got, want)
	}
}

// poolFiles lists the pool's files.
func (e *env) poolFiles() []string {
	e.t.Helper()
	entries, err := os.ReadDir(e.pool)
	if err != nil {
		e.t.Fatal(err)
	}
	out := []string{}
	for _, en := range entries {
		out = append(out, en.Name())
	}
	return out
}

func (e *env) expectPool(want ...string) {
	e.t.Helper()
	want = slices.Clone(want)
	sort.Strings(want)
	if got := e.poolFiles(); !slices.Equal(got, want) {
		e.t.Fatalf("pool holds %v, want %v", got, want)
	}
}

// finish is how every scenario ends: Check finds nothing, qemu-img check
// passes on every image in the pool, every file in the pool is an image
// storage records (nothing leaked) and every recorded image exists.
func (e *env) finish() {
	e.t.Helper()
	e.verify()
	problems, err := e.d.Storage().Check(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	if len(problems) > 0 {
		e.t.Fatalf("Check found %+v", problems)
	}
	rec, err := e.d.Storage().Domain(e.ctx, e.key())
	if err != nil {
		e.t.Fatal(err)
	}
	var recorded []string
	for p := range rec.Images {
		if filepath.Dir(p) != e.pool {
			e.t.Fatalf("recorded image %s is outside the pool", p)
		}
		recorded = append(recorded, filepath.Base(p))
	}
	sort.Strings(recorded)
	if files := e.poolFiles(); !slices.Equal(files, recorded) {
		e.t.Fatalf("pool holds %v, storage records %v", files, recorded)
	}
	for _, f := range recorded {
		run(e.t, "qemu-img", "check", "-q", "-f", "qcow2", e.path(f))
	}
}

// chainOf is a disk's chain from DiskList, as file names.
// revertedToNonLeaf builds the tree of the revert-then-delete tests:
// data 0, s1, data 1, s2, data 2, a revert to s1 (a non-leaf), data 3.
func (e *env) revertedToNonLeaf() {
	e.t.Helper()
	e.write(0)
	e.snap("s1", driver.CreateDiskOnly)
	e.write(1)
	e.snap("s2", driver.CreateDiskOnly)
	e.write(2)
	e.revert("s1", 0)
	e.write(3)
}

func (e *env) chainOf(disk string) []string {
	e.t.Helper()
	list, err := e.d.DiskList(e.ctx, e.dom)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, di := range list {
		if di.Target == disk {
			var out []string
			for _, p := range di.Chain {
				out = append(out, filepath.Base(p))
			}
			return out
		}
	}
	e.t.Fatalf("DiskList has no disk %s", disk)
	return nil
}

// key is the domain's key in storage.
func (e *env) key() string {
	e.t.Helper()
	k, err := e.d.DomainKey(e.ctx, e.dom)
	if err != nil {
		e.t.Fatalf("DomainKey: %v", err)
	}
	return k
}

package integration

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage"
)

// The tests in this file share a folder of images and definitions with
// others, as real pools are shared: linked clones, detached disks, user
// names, moved images, two folders with the same domain name. Each
// asserts on data read back through every definition that names an
// image, and on what is left in the folder.

// world is a folder that is both a folder source and a pool, and a state
// folder that may outlive a driver.
type world struct {
	t     *testing.T
	ctx   context.Context
	dir   string
	state string
	d     *driver.Driver
}

func newWorld(t *testing.T) *world {
	t.Helper()
	t.Parallel()
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return &world{t: t, ctx: context.Background(), dir: dir, state: t.TempDir()}
}

func (w *world) path(name string) string { return filepath.Join(w.dir, name) }

// openWholeFolder opens the driver with the whole folder as its pool (the
// default is the folders of the disks, which a test may move).
func (w *world) openWholeFolder() {
	w.t.Helper()
	w.openWith(w.dir)
}

// open (re)opens the driver on the folder, as a new command would.
func (w *world) open() *driver.Driver {
	w.t.Helper()
	return w.openWith()
}

func (w *world) openWith(pools ...string) *driver.Driver {
	w.t.Helper()
	if w.d != nil {
		w.d.Close()
	}
	src, err := driver.NewDirSource(w.dir)
	if err != nil {
		w.t.Fatal(err)
	}
	d, err := driver.Open(w.ctx, driver.Config{StateDir: w.state, Source: src, Pools: pools})
	if err != nil {
		w.t.Fatalf("driver.Open: %v", err)
	}
	w.t.Cleanup(func() { d.Close() })
	w.d = d
	return d
}

// image makes a qcow2 image, backed by backing when given.
func (w *world) image(name, backing string) string {
	w.t.Helper()
	args := []string{"create", "-q", "-f", "qcow2"}
	if backing != "" {
		args = append(args, "-F", "qcow2", "-b", w.path(backing))
	}
	run(w.t, "qemu-img", append(args, w.path(name), diskSize)...)
	return w.path(name)
}

// vdisk is a disk of a definition: target and image name in the folder.
type vdisk struct{ target, image string }

// define writes NAME.xml with a UUID and the given disks.
func (w *world) define(name, uuid string, disks ...vdisk) {
	w.t.Helper()
	var ds []string
	for _, d := range disks {
		ds = append(ds, fileDisk(d.target, w.path(d.image), "qcow2"))
	}
	doc := oneDiskXML(name, ds...)
	if uuid != "" {
		doc = strings.Replace(doc, "</name>", "</name>\n  <uuid>"+uuid+"</uuid>", 1)
	}
	if err := os.WriteFile(w.path(name+".xml"), []byte(doc), 0o644); err != nil {
		w.t.Fatal(err)
	}
}

// write fills [off, off+n) of an image with pattern (offsets in KiB).
func (w *world) write(image string, pattern byte, offK, lenK int) {
	w.t.Helper()
	run(w.t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%02x %dk %dk", pattern, offK, lenK), w.path(image))
}

// expect reads [off, off+n) of an image (and its chain) back.
func (w *world) expect(image string, pattern byte, offK, lenK int) {
	w.t.Helper()
	p := image
	if !filepath.IsAbs(p) {
		p = w.path(image)
	}
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-r", "-c", fmt.Sprintf("read -P 0x%02x %dk %dk", pattern, offK, lenK), p).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") {
		w.t.Fatalf("%s at %dk+%dk: want 0x%02x: %v\n%s", image, offK, lenK, pattern, err, out)
	}
	run(w.t, "qemu-img", "check", "-q", "-f", "qcow2", p)
}

// source is the image a definition's disk names now.
func (w *world) source(domain, target string) string {
	w.t.Helper()
	b, err := os.ReadFile(w.path(domain + ".xml"))
	if err != nil {
		w.t.Fatal(err)
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(string(b)); err != nil {
		w.t.Fatalf("%s.xml: %v", domain, err)
	}
	for _, d := range def.Devices.Disks {
		if d.Target != nil && d.Target.Dev == target && d.Source != nil && d.Source.File != nil {
			return d.Source.File.File
		}
	}
	w.t.Fatalf("%s.xml has no disk %s:\n%s", domain, target, b)
	return ""
}

// files lists the images in the folder and its subfolders.
func (w *world) files() []string {
	w.t.Helper()
	var out []string
	err := filepath.WalkDir(w.dir, func(p string, e fs.DirEntry, err error) error {
		if err == nil && e.Type().IsRegular() && !strings.HasSuffix(p, ".xml") {
			rel, _ := filepath.Rel(w.dir, p)
			out = append(out, rel)
		}
		return err
	})
	if err != nil {
		w.t.Fatal(err)
	}
	return out
}

func (w *world) expectFiles(want ...string) {
	w.t.Helper()
	slices.Sort(want)
	if got := w.files(); !slices.Equal(got, want) {
		w.t.Fatalf("folder holds %v, want %v", got, want)
	}
}

func (w *world) snap(domain, name string) {
	w.t.Helper()
	if _, err := w.d.SnapshotCreateXML(w.ctx, domain, snapXML(name), driver.CreateDiskOnly); err != nil {
		w.t.Fatalf("snapshot %s of %s: %v", name, domain, err)
	}
}

func (w *world) del(domain, name string, flags driver.DeleteFlags) *driver.DeleteReport {
	w.t.Helper()
	r, err := w.d.SnapshotDelete(w.ctx, domain, name, flags)
	if err != nil {
		w.t.Fatalf("delete %s of %s: %v", name, domain, err)
	}
	return r
}

func (w *world) revert(domain, name string) {
	w.t.Helper()
	if err := w.d.RevertToSnapshot(w.ctx, domain, name, 0); err != nil {
		w.t.Fatalf("revert %s to %s: %v", domain, name, err)
	}
}

// problems runs check and returns "kind path" for each finding.
func (w *world) problems() []string {
	w.t.Helper()
	ps, err := w.d.Storage().Check(w.ctx)
	if err != nil {
		w.t.Fatal(err)
	}
	var out []string
	for _, p := range ps {
		out = append(out, string(p.Kind)+" "+filepath.Base(p.Path))
	}
	return out
}

// TestOpenWorldLinkedClone: vm1 writes to base.qcow2, which also backs
// vm2's clone. Deleting vm1's snapshot must neither commit into the base
// (vm2 would read vm1's data) nor pull it away (vm2 would lose its
// backing file), whatever the sizes, and vm2 is never looked at first.
func TestOpenWorldLinkedClone(t *testing.T) {
	for _, big := range []bool{false, true} {
		t.Run(fmt.Sprintf("big=%v", big), func(t *testing.T) {
			w := newWorld(t)
			w.image("base.qcow2", "")
			w.write("base.qcow2", 0x10, 0, 1024)
			w.image("clone.qcow2", "base.qcow2")
			w.define("vm1", "", vdisk{"xvda", "base.qcow2"})
			w.define("vm2", "", vdisk{"xvda", "clone.qcow2"})
			w.open()
			w.snap("vm1", "s1")
			top := w.source("vm1", "xvda")
			if top != w.path("base.s1") {
				t.Fatalf("vm1 on %s", top)
			}
			n := 64
			if big {
				n = 4096 // the top holds more: a pull-up would be cheaper
			}
			w.write("base.s1", 0x11, 0, n)
			r := w.del("vm1", "s1", 0)
			if len(r.Disks) != 1 || r.Disks[0].Action != driver.ActionSharedBase {
				t.Fatalf("report %+v", r.Disks)
			}
			if us := r.Disks[0].Users; len(us) == 0 || !slices.ContainsFunc(us, func(u driver.ImageUser) bool { return u.Path == w.path("clone.qcow2") }) {
				t.Fatalf("shared base kept without naming the clone: %+v", us)
			}
			w.expect("clone.qcow2", 0x10, 0, 1024)
			w.expect("base.qcow2", 0x10, 0, 1024)
			w.expect(w.source("vm1", "xvda"), 0x11, 0, n)
			w.expectFiles("base.qcow2", "base.s1", "clone.qcow2")
			if got, want := w.problems(), []string{"shared-base base.qcow2"}; !slices.Equal(got, want) {
				t.Fatalf("check: %v, want %v", got, want)
			}
		})
	}
}

// TestOpenWorldDetachedDisk: xvdb's current data lives in an overlay
// xlsnap made; once xvdb leaves the definition (or names another file),
// that data is the user's and no delete may remove it.
func TestOpenWorldDetachedDisk(t *testing.T) {
	for _, how := range []string{"removed", "switched"} {
		for _, which := range []string{"s2", "s1"} {
			t.Run(how+"/delete-"+which, func(t *testing.T) {
				w := newWorld(t)
				w.image("a.qcow2", "")
				w.image("b.qcow2", "")
				w.write("b.qcow2", 0x21, 0, 64)
				w.define("vm", "", vdisk{"xvda", "a.qcow2"}, vdisk{"xvdb", "b.qcow2"})
				w.open()
				w.snap("vm", "s1")
				w.write("b.s1", 0x22, 0, 64)
				if how == "removed" {
					w.define("vm", "", vdisk{"xvda", "a.s1"})
				} else {
					w.image("c.qcow2", "")
					w.define("vm", "", vdisk{"xvda", "a.s1"}, vdisk{"xvdb", "c.qcow2"})
				}
				w.snap("vm", "s2")
				w.del("vm", which, 0)
				w.expect("b.s1", 0x22, 0, 64)
				w.expect("b.qcow2", 0x21, 0, 64)
				if which == "s2" {
					w.del("vm", "s1", 0)
				} else {
					w.del("vm", "s2", 0)
				}
				w.expect("b.s1", 0x22, 0, 64)
				w.expect("b.qcow2", 0x21, 0, 64)
				if got := w.source("vm", "xvda"); got != w.path("a.qcow2") {
					t.Fatalf("xvda on %s after deleting every snapshot, want a.qcow2", got)
				}
				// xvdb's data is reported as the user's, kept.
				if got, want := w.problems(), []string{"detached-data b.s1"}; !slices.Equal(got, want) {
					t.Fatalf("check: %v, want %v", got, want)
				}
			})
		}
	}
}

// TestOpenWorldUserNames: after the last snapshot goes, the disk is back
// on the image the user named, whichever direction the merge took, and
// the snapshot's name can be used again.
func TestOpenWorldUserNames(t *testing.T) {
	for _, n := range []int{64, 4096} {
		t.Run(fmt.Sprintf("top=%dk", n), func(t *testing.T) {
			w := newWorld(t)
			w.image("a.qcow2", "")
			w.write("a.qcow2", 0x31, 0, 1024)
			w.define("vm", "", vdisk{"xvda", "a.qcow2"})
			w.open()
			for round := range 2 {
				w.snap("vm", "s1")
				w.write("a.s1", byte(0x32+round), 0, n)
				r := w.del("vm", "s1", 0)
				if r.Disks[0].Kept != w.path("a.qcow2") {
					t.Fatalf("round %d: report %+v", round, r.Disks)
				}
				if got := w.source("vm", "xvda"); got != w.path("a.qcow2") {
					t.Fatalf("round %d: disk on %s, want a.qcow2", round, got)
				}
				w.expectFiles("a.qcow2")
				w.expect("a.qcow2", byte(0x32+round), 0, n)
				if n < 1024 {
					w.expect("a.qcow2", 0x31, n, 1024-n)
				}
			}
			if got := w.problems(); len(got) > 0 {
				t.Fatalf("check: %v", got)
			}
		})
	}
}

// TestOpenWorldDefinitionFollowsSnapshot: a disk added after s1 leaves
// the definition on a revert to s1 (its data kept) and comes back on a
// revert to s2, without FORCE.
func TestOpenWorldDefinitionFollowsSnapshot(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.image("b.qcow2", "")
	w.write("b.qcow2", 0x41, 0, 64)
	w.define("vm", "", vdisk{"xvda", "a.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.define("vm", "", vdisk{"xvda", "a.s1"}, vdisk{"xvdb", "b.qcow2"})
	w.snap("vm", "s2")
	w.write("b.s2", 0x42, 0, 64)
	w.revert("vm", "s1")
	b, err := os.ReadFile(w.path("vm.xml"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "xvdb") {
		t.Fatalf("xvdb is still defined after reverting to s1:\n%s", b)
	}
	w.expect("b.s2", 0x42, 0, 64) // the user's now: kept
	w.revert("vm", "s2")
	w.expect(w.source("vm", "xvdb"), 0x41, 0, 64)
	w.expect("b.s2", 0x42, 0, 64)
	for _, name := range []string{"s1", "s2"} {
		w.del("vm", name, 0)
	}
	w.expect("b.s2", 0x42, 0, 64)
	w.expect("b.qcow2", 0x41, 0, 64)
	// b.s2, the data xvdb left behind, is recorded and reported as the
	// user's: no orphan.
	if got, want := w.problems(), []string{"detached-data b.s2"}; !slices.Equal(got, want) {
		t.Fatalf("check: %v, want %v", got, want)
	}
}

// TestOpenWorldSameNameTwoFolders: two domains called web, in two
// folders, with one state folder: they never share snapshots; a domain
// renamed keeps its own.
func TestOpenWorldSameNameTwoFolders(t *testing.T) {
	a, b := newWorld(t), &world{t: t, ctx: context.Background()}
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b.dir, b.state = dir, a.state
	for i, w := range []*world{a, b} {
		w.image("web.qcow2", "")
		w.write("web.qcow2", byte(0x51+i), 0, 64)
		w.define("web", fmt.Sprintf("6b0c6c1e-0000-4000-8000-00000000000%d", i), vdisk{"xvda", "web.qcow2"})
	}
	a.open()
	a.snap("web", "s1")
	a.d.Close()
	a.d = nil
	b.open()
	if list, err := b.d.ListAllSnapshots(b.ctx, "web", 0); err != nil || len(list) != 0 {
		t.Fatalf("folder B lists %d snapshots (%v), want none", len(list), err)
	}
	before := b.files()
	b.snap("web", "s1")
	b.write("web.s1", 0x5f, 0, 64)
	b.revert("web", "s1")
	b.expect(b.source("web", "xvda"), 0x52, 0, 64)
	if slices.Equal(before, b.files()) {
		t.Fatalf("folder B unchanged by its own snapshot")
	}
	b.d.Close()
	b.d = nil
	a.expectFiles("web.qcow2", "web.s1")
	// Renamed (same UUID): web's snapshots are web2's.
	doc, err := os.ReadFile(a.path("web.xml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(a.path("web2.xml"), []byte(strings.Replace(string(doc), "<name>web</name>", "<name>web2</name>", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(a.path("web.xml")); err != nil {
		t.Fatal(err)
	}
	a.open()
	list, err := a.d.ListAllSnapshots(a.ctx, "web2", 0)
	if err != nil || len(list) != 1 || list[0].Name != "s1" {
		t.Fatalf("renamed domain lists %v (%v), want s1", names(list), err)
	}
	a.del("web2", "s1", 0)
	a.expect(a.source("web2", "xvda"), 0x51, 0, 64)
}

// TestOpenWorldRepairKeepsNamedFiles: an overlay no record holds but a
// definition names is a user, not an orphan: repair keeps it.
func TestOpenWorldRepairKeepsNamedFiles(t *testing.T) {
	w := newWorld(t)
	w.image("vm.qcow2", "")
	w.define("vm", "", vdisk{"xvda", "vm.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.image("newvm.qcow2", "vm.qcow2")
	w.define("newvm", "", vdisk{"xvda", "newvm.qcow2"})
	ps, err := w.d.Storage().Repair(w.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 1 || ps[0].Kind != storage.ProblemSharedBase || !strings.Contains(ps[0].Detail, "newvm") {
		t.Fatalf("repair: %+v", ps)
	}
	w.expectFiles("newvm.qcow2", "vm.qcow2", "vm.s1")
	// The base it shares is kept by the delete too.
	if r := w.del("vm", "s1", 0); r.Disks[0].Action != driver.ActionSharedBase {
		t.Fatalf("report %+v", r.Disks)
	}
	w.expectFiles("newvm.qcow2", "vm.qcow2", "vm.s1")
}

// TestOpenWorldMovedImages: the folder is renamed, backing references
// and the definition fixed by hand, the disk rescanned: the snapshot
// records follow, and revert and delete read back the right data. Before
// the rescan, an operation that needs the gone images is refused with
// their list and changes nothing.
func TestOpenWorldMovedImages(t *testing.T) {
	w := newWorld(t)
	old := filepath.Join(w.dir, "old")
	if err := os.Mkdir(old, 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(old, "a.qcow2"), diskSize)
	w.write("old/a.qcow2", 0x61, 0, 64)
	w.define("vm", "", vdisk{"xvda", "old/a.qcow2"})
	w.openWholeFolder()
	w.snap("vm", "s1")
	w.write("old/a.s1", 0x62, 0, 64)
	w.snap("vm", "s2")
	w.write("old/a.s2", 0x63, 0, 64)

	if err := os.Rename(old, filepath.Join(w.dir, "new")); err != nil {
		t.Fatal(err)
	}
	nw := func(n string) string { return filepath.Join(w.dir, "new", n) }
	// Until the definition names the moved images, the domain's disk is
	// gone: refused, nothing changed.
	before := w.files()
	if err := w.d.RevertToSnapshot(w.ctx, "vm", "s1", 0); err == nil {
		t.Fatalf("revert with the images gone succeeded")
	}
	if got := w.files(); !slices.Equal(got, before) {
		t.Fatalf("refused revert changed the folder: %v -> %v", before, got)
	}
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", nw("a.qcow2"), nw("a.s1"))
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", nw("a.s1"), nw("a.s2"))
	w.define("vm", "", vdisk{"xvda", "new/a.s2"})
	if err := w.d.ChainChanged(w.ctx, "vm", "xvda"); err != nil {
		t.Fatalf("rescan: %v", err)
	}
	for _, name := range []string{"s1", "s2"} {
		s, err := w.d.SnapshotLookupByName(w.ctx, "vm", name, 0)
		if err != nil {
			t.Fatal(err)
		}
		if img := s.Disk("xvda").Image; !strings.HasPrefix(img, filepath.Join(w.dir, "new")+"/") {
			t.Fatalf("snapshot %s still names %s", name, img)
		}
	}
	w.revert("vm", "s2")
	w.expect(w.source("vm", "xvda"), 0x62, 0, 64)
	w.revert("vm", "s1")
	w.expect(w.source("vm", "xvda"), 0x61, 0, 64)
	w.del("vm", "s1", driver.DeleteChildren)
	w.expect(w.source("vm", "xvda"), 0x61, 0, 64)
	if got := w.source("vm", "xvda"); got != nw("a.qcow2") {
		t.Fatalf("disk on %s, want the user's new/a.qcow2", got)
	}
}

// TestOpenWorldMissingImagesRefused: a delete that needs an image that is
// gone is refused up front, naming it, and changes nothing.
func TestOpenWorldMissingImagesRefused(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.image("b.qcow2", "")
	w.define("vm", "", vdisk{"xvda", "a.qcow2"}, vdisk{"xvdb", "b.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.snap("vm", "s2")
	if err := os.Rename(w.path("b.s1"), w.path("elsewhere")); err != nil {
		t.Fatal(err)
	}
	before := w.files()
	_, err := w.d.SnapshotDelete(w.ctx, "vm", "s2", 0)
	if !errors.Is(err, storage.ErrChainBroken) || !strings.Contains(err.Error(), w.path("b.s1")) {
		t.Fatalf("delete with an image gone: %v, want ErrChainBroken naming b.s1", err)
	}
	if got := w.files(); !slices.Equal(got, before) {
		t.Fatalf("refused delete changed the folder: %v -> %v", before, got)
	}
}

// TestOpenWorldFailClosed: an image whose header cannot be read might
// hold internal snapshots a merge would change: the delete stops.
func TestOpenWorldFailClosed(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.define("vm", "", vdisk{"xvda", "a.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.snap("vm", "s2")
	// Set the corrupt bit of a.s2 (incompatible features, byte 79).
	f, err := os.OpenFile(w.path("a.s2"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0x02}, 79); err != nil {
		t.Fatal(err)
	}
	f.Close()
	before := w.files()
	if _, err := w.d.SnapshotDelete(w.ctx, "vm", "s1", 0); err == nil {
		t.Fatalf("delete over an unreadable header succeeded")
	}
	if got := w.files(); !slices.Equal(got, before) {
		t.Fatalf("refused delete changed the folder: %v -> %v", before, got)
	}
	list, err := w.d.ListAllSnapshots(w.ctx, "vm", 0)
	if err != nil || len(list) != 2 {
		t.Fatalf("snapshots after the refusal: %v (%v)", names(list), err)
	}
}

// TestOpenWorldMissingChildRefused: s2's state image is gone for a while;
// deleting s1 would merge into the image below it, which s2 still reads:
// refused, and once the image is back every snapshot reads its data.
func TestOpenWorldMissingChildRefused(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.write("a.qcow2", 0x1a, 0, 1024)
	w.define("vm", "", vdisk{"xvda", "a.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.write("a.s1", 0x2a, 0, 64)
	w.snap("vm", "s2")
	w.write("a.s2", 0x3a, 0, 64)
	w.revert("vm", "s1")
	w.write(filepath.Base(w.source("vm", "xvda")), 0x4a, 512, 64)
	if err := os.Rename(w.path("a.s1"), w.path("gone")); err != nil {
		t.Fatal(err)
	}
	before := w.files()
	_, err := w.d.SnapshotDelete(w.ctx, "vm", "s1", 0)
	if !errors.Is(err, storage.ErrChainBroken) || !strings.Contains(err.Error(), w.path("a.s1")) {
		t.Fatalf("delete while s2's image is gone: %v, want ErrChainBroken naming a.s1", err)
	}
	if got := w.files(); !slices.Equal(got, before) {
		t.Fatalf("refused delete changed the folder: %v -> %v", before, got)
	}
	if err := os.Rename(w.path("gone"), w.path("a.s1")); err != nil {
		t.Fatal(err)
	}
	w.del("vm", "s1", 0)
	w.revert("vm", "s2")
	w.expect(w.source("vm", "xvda"), 0x2a, 0, 64)
	w.expect(w.source("vm", "xvda"), 0x1a, 512, 64)
}

// TestOpenWorldDuplicateUUID: a copied definition that kept its UUID
// would share the original's snapshots: both are refused, nothing is
// rewritten.
func TestOpenWorldDuplicateUUID(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.image("b.qcow2", "")
	const u = "11111111-1111-4111-8111-111111111111"
	w.define("vm", u, vdisk{"xvda", "a.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.define("vm2", u, vdisk{"xvda", "b.qcow2"})
	before, _ := os.ReadFile(w.path("vm2.xml"))
	for _, dom := range []string{"vm", "vm2"} {
		_, err := w.d.ListAllSnapshots(w.ctx, dom, 0)
		if !errors.Is(err, driver.ErrDuplicateUUID) || driver.Code(err) != driver.ErrNumOperationFailed {
			t.Fatalf("list of %s with a duplicate uuid: %v (code %d)", dom, err, driver.Code(err))
		}
	}
	if err := w.d.RevertToSnapshot(w.ctx, "vm2", "s1", 0); !errors.Is(err, driver.ErrDuplicateUUID) {
		t.Fatalf("revert of vm2: %v", err)
	}
	if after, _ := os.ReadFile(w.path("vm2.xml")); string(after) != string(before) {
		t.Fatalf("vm2.xml rewritten:\n%s", after)
	}
}

// TestOpenWorldOperatorSwapsDisks: the operator points each disk at the
// other's image; that is their choice and it stands.
func TestOpenWorldOperatorSwapsDisks(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.write("a.qcow2", 0x1a, 0, 64)
	w.image("b.qcow2", "")
	w.write("b.qcow2", 0x1b, 0, 64)
	w.define("vm", "", vdisk{"xvda", "a.qcow2"}, vdisk{"xvdb", "b.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.define("vm", "", vdisk{"xvda", "b.s1"}, vdisk{"xvdb", "a.s1"})
	list, err := w.d.DiskList(w.ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	if list[0].Source != w.path("b.s1") || list[1].Source != w.path("a.s1") {
		t.Fatalf("domblklist after the swap: %+v", list)
	}
	w.snap("vm", "s2")
	w.expect(w.source("vm", "xvda"), 0x1b, 0, 64)
	w.expect(w.source("vm", "xvdb"), 0x1a, 0, 64)
}

// TestOpenWorldSnapshotOfSharedDisk: another domain names vm's disk as
// its own: an external snapshot would make it a backing file under that
// domain's writes, an internal one would write into it: both refused.
func TestOpenWorldSnapshotOfSharedDisk(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.define("vm", "", vdisk{"xvda", "a.qcow2"})
	w.define("rescue", "", vdisk{"xvda", "a.qcow2"})
	w.open()
	before := w.files()
	for _, doc := range []string{snapXML("s1"), "<domainsnapshot><name>s1</name><disks><disk name='xvda' snapshot='internal'/></disks></domainsnapshot>"} {
		var flags driver.CreateFlags
		if !strings.Contains(doc, "internal") {
			flags = driver.CreateDiskOnly
		}
		_, err := w.d.SnapshotCreateXML(w.ctx, "vm", doc, flags)
		if !errors.Is(err, driver.ErrOperationInvalid) || !strings.Contains(err.Error(), "rescue") {
			t.Fatalf("snapshot of a disk rescue names too: %v", err)
		}
	}
	if got := w.files(); !slices.Equal(got, before) {
		t.Fatalf("refused snapshot changed the folder: %v -> %v", before, got)
	}
	if src := w.source("rescue", "xvda"); src != w.path("a.qcow2") {
		t.Fatalf("rescue now on %s", src)
	}
}

// TestOpenWorldLostCharacters: a name XML could not carry arrives with
// U+FFFD in it; it is refused rather than stored as another name.
func TestOpenWorldLostCharacters(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.define("vm", "", vdisk{"xvda", "a.qcow2"})
	w.open()
	_, err := w.d.SnapshotCreateXML(w.ctx, "vm", "<domainsnapshot><name>e\uFFFD</name></domainsnapshot>", driver.CreateDiskOnly)
	if !errors.Is(err, driver.ErrInvalidArg) {
		t.Fatalf("a name with U+FFFD: %v", err)
	}
	w.expectFiles("a.qcow2")
}

// TestOpenWorldMovedFolder: rescan --moved with a folder moves every
// image of the tree inside it; errors name the domain, not its key.
func TestOpenWorldMovedFolder(t *testing.T) {
	w := newWorld(t)
	if err := os.Mkdir(w.path("old"), 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", w.path("old/a.qcow2"), diskSize)
	w.write("old/a.qcow2", 0x61, 0, 64)
	w.define("vm", "", vdisk{"xvda", "old/a.qcow2"})
	w.openWholeFolder()
	w.snap("vm", "s1")
	w.write("old/a.s1", 0x62, 0, 64)
	if _, err := w.d.SnapshotCreateXML(w.ctx, "vm", snapXML("s1"), driver.CreateDiskOnly); !errors.Is(err, driver.ErrSnapshotExists) ||
		strings.Contains(err.Error(), "@") || !strings.Contains(err.Error(), "domain moment s1 already exists") {
		t.Fatalf("error names %v, want libvirt's words and no domain key", err)
	}
	// Copied (the old folder stays for now), backing fixed, definition fixed.
	run(t, "cp", "-a", w.path("old"), w.path("new"))
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", w.path("new/a.qcow2"), w.path("new/a.s1"))
	w.define("vm", "", vdisk{"xvda", "new/a.s1"})
	if err := w.d.ChainChanged(w.ctx, "vm", "xvda", driver.Move{From: w.path("old"), To: w.path("new")}); err != nil {
		t.Fatalf("rescan --moved old=new: %v", err)
	}
	s, err := w.d.SnapshotLookupByName(w.ctx, "vm", "s1", 0)
	if err != nil || s.Disk("xvda").Image != w.path("new/a.qcow2") {
		t.Fatalf("s1 after the move: %+v %v", s, err)
	}
	if err := os.RemoveAll(w.path("old")); err != nil {
		t.Fatal(err)
	}
	// The definition of s1's time, which a revert writes back, names the
	// moved image too.
	doc, err := w.d.SnapshotGetXMLDesc(w.ctx, "vm", "s1", 0)
	if err != nil || !strings.Contains(doc, "<source file='"+w.path("new/a.qcow2")+"'/>") || strings.Contains(doc, w.path("old")) {
		t.Fatalf("s1's XML after the move (%v):\n%s", err, doc)
	}
	w.revert("vm", "s1")
	w.expect(w.source("vm", "xvda"), 0x61, 0, 64)
	w.del("vm", "s1", 0)
	if got := w.source("vm", "xvda"); got != w.path("new/a.qcow2") {
		t.Fatalf("disk on %s, want new/a.qcow2", got)
	}
	w.expect(w.source("vm", "xvda"), 0x61, 0, 64)
}

// TestOpenWorldMoveOfUnsnapshottedDisk: xvdb took no part in s1, and its
// image moved afterwards; s1's definition is rewritten with the move, so
// a revert to s1 names the image where it is now, never the removed one.
func TestOpenWorldMoveOfUnsnapshottedDisk(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.image("b.qcow2", "")
	w.write("b.qcow2", 0x71, 0, 64)
	w.define("vm", "", vdisk{"xvda", "a.qcow2"}, vdisk{"xvdb", "b.qcow2"})
	w.open()
	doc := "<domainsnapshot><name>s1</name><disks><disk name='xvda' snapshot='external'/><disk name='xvdb' snapshot='no'/></disks></domainsnapshot>"
	if _, err := w.d.SnapshotCreateXML(w.ctx, "vm", doc, driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(w.path("moved"), 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "cp", w.path("b.qcow2"), w.path("moved/b.qcow2"))
	w.define("vm", "", vdisk{"xvda", "a.s1"}, vdisk{"xvdb", "moved/b.qcow2"})
	if err := w.d.ChainChanged(w.ctx, "vm", "xvdb", driver.Move{From: w.path("b.qcow2"), To: w.path("moved/b.qcow2")}); err != nil {
		t.Fatalf("rescan xvdb --moved: %v", err)
	}
	if err := os.Remove(w.path("b.qcow2")); err != nil {
		t.Fatal(err)
	}
	out, err := w.d.SnapshotGetXMLDesc(w.ctx, "vm", "s1", 0)
	if err != nil || !strings.Contains(out, "<source file='"+w.path("moved/b.qcow2")+"'/>") || strings.Contains(out, "'"+w.path("b.qcow2")+"'") {
		t.Fatalf("s1's XML after xvdb's move (%v):\n%s", err, out)
	}
	w.write("moved/b.qcow2", 0x72, 0, 64)
	w.revert("vm", "s1")
	if got := w.source("vm", "xvdb"); got != w.path("moved/b.qcow2") {
		t.Fatalf("xvdb on %s after the revert, want moved/b.qcow2", got)
	}
	w.expect("moved/b.qcow2", 0x72, 0, 64)
	if got := w.problems(); len(got) > 0 {
		t.Fatalf("check: %v", got)
	}
}

// TestOpenWorldRevertBringsBackUnsnapshottedDisk: xvdb took no part in
// s1 and left the definition later; a revert to s1 brings it back on the
// image s1's definition names, recorded, its data as it is now.
func TestOpenWorldRevertBringsBackUnsnapshottedDisk(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.image("b.qcow2", "")
	w.write("b.qcow2", 0x71, 0, 64)
	w.define("vm", "", vdisk{"xvda", "a.qcow2"}, vdisk{"xvdb", "b.qcow2"})
	w.open()
	doc := "<domainsnapshot><name>s1</name><disks><disk name='xvda' snapshot='external'/><disk name='xvdb' snapshot='no'/></disks></domainsnapshot>"
	if _, err := w.d.SnapshotCreateXML(w.ctx, "vm", doc, driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	w.define("vm", "", vdisk{"xvda", "a.s1"})
	w.write("b.qcow2", 0x72, 0, 64)
	w.revert("vm", "s1")
	if got := w.source("vm", "xvdb"); got != w.path("b.qcow2") {
		t.Fatalf("xvdb on %s, want b.qcow2", got)
	}
	list, err := w.d.DiskList(w.ctx, "vm")
	if err != nil || len(list) != 2 || list[1].Target != "xvdb" || !slices.Equal(list[1].Chain, []string{w.path("b.qcow2")}) {
		t.Fatalf("domblklist: %+v %v", list, err)
	}
	w.expect("b.qcow2", 0x72, 0, 64)
	if got := w.problems(); len(got) > 0 {
		t.Fatalf("check: %v", got)
	}
}

// TestOpenWorldOtherSourceCrashed: folder A's delete was killed after its
// metadata committed; folder B shares the state folder. B's commands
// neither fail on A's pending operation nor rewrite B's own "web"; A's
// next command finishes it.
func TestOpenWorldOtherSourceCrashed(t *testing.T) {
	a := newWorld(t)
	b := &world{t: t, ctx: context.Background(), state: a.state}
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	b.dir = dir
	for i, w := range []*world{a, b} {
		w.image("web.qcow2", "")
		w.write("web.qcow2", byte(0x51+i), 0, 1024)
		w.define("web", fmt.Sprintf("6b0c6c1e-0000-4000-8000-00000000010%d", i), vdisk{"xvda", "web.qcow2"})
	}
	a.open()
	a.snap("web", "s1")
	a.write("web.s1", 0x5a, 0, 64)
	a.d.Close()
	a.d = nil
	// A's delete, killed once its metadata is durable: its definition
	// step and cleanup are pending.
	cmd := exec.Command(xlsnapBinary(t), "--connect", "file://"+a.dir, "--state-dir", a.state, "snapshot-delete", "web", "s1")
	cmd.Env = append(os.Environ(), "XLSNAP_CRASH_AT=delete/committed")
	if err := cmd.Run(); err == nil {
		t.Fatal("the delete was not killed")
	}
	bDef, _ := os.ReadFile(b.path("web.xml"))
	b.open()
	b.snap("web", "s1")
	if got := b.problems(); len(got) > 0 {
		t.Fatalf("B's check sees A's operation: %v", got)
	}
	b.d.Close()
	b.d = nil
	if after, _ := os.ReadFile(b.path("web.xml")); string(after) == string(bDef) {
		t.Fatal("B's own snapshot did not rewrite B's definition")
	} else if strings.Contains(string(after), a.dir) {
		t.Fatalf("B's definition names A's images:\n%s", after)
	}
	a.open()
	if got := a.problems(); len(got) > 0 {
		t.Fatalf("A after recovery: %v", got)
	}
	if got := a.source("web", "xvda"); got != a.path("web.qcow2") {
		t.Fatalf("A's web on %s", got)
	}
	a.expect("web.qcow2", 0x5a, 0, 64)
	a.expect("web.qcow2", 0x51, 64, 960)
}

// xlsnapBinary builds the command once for tests that kill it.
func xlsnapBinary(t *testing.T) string {
	t.Helper()
	binOnce.Do(func() {
		dir, err := os.MkdirTemp("", "xlsnap-bin")
		if err != nil {
			binErr = err
			return
		}
		binPath = filepath.Join(dir, "xlsnap")
		if out, err := exec.Command("go", "build", "-o", binPath, "github.com/xlsnap/xlsnap/cmd/xlsnap").CombinedOutput(); err != nil {
			binErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

var (
	binOnce sync.Once
	binPath string
	binErr  error
)

// TestOpenWorldEveryUserKeepsTheBase: whatever way something else reads
// vm's base (another domain's cdrom, a second name of the file, a clone
// QEMU opens through a file: or json: reference or from behind a
// symlinked folder of the pool), a delete that would rather pull the base
// up keeps it as a shared base, and that user reads what it read.
func TestOpenWorldEveryUserKeepsTheBase(t *testing.T) {
	otherDomain := func(w *world, device, path string) {
		doc := oneDiskXML("vm3", fmt.Sprintf("    <disk type='file' device='%s'>\n      <driver name='qemu' type='qcow2'/>\n      <source file='%s'/>\n      <target dev='hdc'/>\n      <readonly/>\n    </disk>\n", device, path))
		if err := os.WriteFile(w.path("vm3.xml"), []byte(doc), 0o644); err != nil {
			w.t.Fatal(err)
		}
	}
	clone := func(w *world, ref string) string {
		p := w.path("clone.qcow2")
		run(w.t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", w.path("a.qcow2"), p)
		run(w.t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", ref, p)
		return p
	}
	for how, user := range map[string]func(w *world) string{
		"cdrom": func(w *world) string { otherDomain(w, "cdrom", w.path("a.qcow2")); return w.path("a.qcow2") },
		"hardlink": func(w *world) string {
			if err := os.Link(w.path("a.qcow2"), w.path("link.qcow2")); err != nil {
				w.t.Fatal(err)
			}
			otherDomain(w, "disk", w.path("link.qcow2"))
			return w.path("link.qcow2")
		},
		"file:": func(w *world) string { return clone(w, "file:"+w.path("a.qcow2")) },
		"json:": func(w *world) string {
			return clone(w, `json:{"driver":"qcow2","file":{"driver":"file","filename":"`+w.path("a.qcow2")+`"}}`)
		},
		"symlinked-folder": func(w *world) string {
			elsewhere := w.t.TempDir()
			if err := os.Symlink(elsewhere, w.path("clones")); err != nil {
				w.t.Fatal(err)
			}
			p := filepath.Join(elsewhere, "c.qcow2")
			run(w.t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", w.path("a.qcow2"), p)
			return p
		},
	} {
		t.Run(how, func(t *testing.T) {
			w := newWorld(t)
			w.image("a.qcow2", "")
			w.write("a.qcow2", 0x11, 0, 1024)
			w.define("vm", "", vdisk{"xvda", "a.qcow2"})
			w.open()
			w.snap("vm", "s1")
			w.write("a.s1", 0x12, 0, 4096) // a pull-up would be cheaper
			other := user(w)
			w.expect(other, 0x11, 0, 1024)
			r := w.del("vm", "s1", 0)
			if r.Disks[0].Action != driver.ActionSharedBase {
				t.Fatalf("report %+v", r.Disks)
			}
			w.expect(other, 0x11, 0, 1024)
			w.expect(w.source("vm", "xvda"), 0x12, 0, 4096)
		})
	}
}

// TestOpenWorldMoveMustFit: rescan --moved is checked against the
// images: an unrelated image is not the moved one, and a refusal changes
// nothing.
func TestOpenWorldMoveMustFit(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.write("a.qcow2", 0x11, 0, 64)
	w.define("vm", "", vdisk{"xvda", "a.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.image("keep.qcow2", "")
	w.write("keep.qcow2", 0x77, 0, 64)
	err := w.d.ChainChanged(w.ctx, "vm", "xvda", driver.Move{From: w.path("a.qcow2"), To: w.path("keep.qcow2")})
	if !errors.Is(err, driver.ErrInvalidArg) {
		t.Fatalf("a move onto an unrelated image: %v", err)
	}
	s, err := w.d.SnapshotLookupByName(w.ctx, "vm", "s1", 0)
	if err != nil || s.Disk("xvda").Image != w.path("a.qcow2") {
		t.Fatalf("s1 after the refused move: %+v %v", s, err)
	}
	// Even once the overlay is rebased onto it, so that the chain reads
	// it: the old file is still there and holds other data.
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", w.path("keep.qcow2"), w.path("a.s1"))
	err = w.d.ChainChanged(w.ctx, "vm", "xvda", driver.Move{From: w.path("a.qcow2"), To: w.path("keep.qcow2")})
	if !errors.Is(err, driver.ErrInvalidArg) || !strings.Contains(err.Error(), "holds other data") {
		t.Fatalf("a move onto an unrelated image the chain reads: %v", err)
	}
	if s, err = w.d.SnapshotLookupByName(w.ctx, "vm", "s1", 0); err != nil || s.Disk("xvda").Image != w.path("a.qcow2") {
		t.Fatalf("s1 after the second refused move: %+v %v", s, err)
	}
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", w.path("a.qcow2"), w.path("a.s1"))
	w.revert("vm", "s1")
	w.expect(w.source("vm", "xvda"), 0x11, 0, 64)
	w.expect("keep.qcow2", 0x77, 0, 64)
}

// TestOpenWorldMoveAlreadyFollowed: a folder move the definition already
// led xlsnap to is done: rescan --moved says so without an error.
func TestOpenWorldMoveAlreadyFollowed(t *testing.T) {
	w2 := newWorld(t)
	if err := os.Mkdir(w2.path("img"), 0o755); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", w2.path("img/a.qcow2"), diskSize)
	w2.define("vm", "", vdisk{"xvda", "img/a.qcow2"})
	w2.openWholeFolder()
	w2.snap("vm", "s1")
	if err := os.Rename(w2.path("img"), w2.path("img2")); err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", w2.path("img2/a.qcow2"), w2.path("img2/a.s1"))
	w2.define("vm", "", vdisk{"xvda", "img2/a.s1"})
	if _, err := w2.d.DiskList(w2.ctx, "vm"); err != nil { // follows the move on its own
		t.Fatal(err)
	}
	if err := w2.d.ChainChanged(w2.ctx, "vm", "xvda", driver.Move{From: w2.path("img"), To: w2.path("img2")}); err != nil {
		t.Fatalf("rescan --moved of a move already followed: %v", err)
	}
}

// TestOpenWorldTwoFoldersOnePool: folders A and B share a pool and a
// state folder; B's vm2 names A's disk image as its own. A may not turn
// it into a backing file under vm2's writes.
func TestOpenWorldTwoFoldersOnePool(t *testing.T) {
	pool := newWorld(t)
	pool.image("x.qcow2", "")
	openIn := func(defs string) *driver.Driver {
		src, err := driver.NewDirSource(defs)
		if err != nil {
			t.Fatal(err)
		}
		d, err := driver.Open(pool.ctx, driver.Config{StateDir: pool.state, Source: src, Pools: []string{pool.dir}})
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	a, b := t.TempDir(), t.TempDir()
	for dir, name := range map[string]string{a: "vm", b: "vm2"} {
		doc := oneDiskXML(name, fileDisk("xvda", pool.path("x.qcow2"), "qcow2"))
		if err := os.WriteFile(filepath.Join(dir, name+".xml"), []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	db := openIn(b)
	if _, err := db.DiskList(pool.ctx, "vm2"); err != nil { // vm2 recorded
		t.Fatal(err)
	}
	db.Close()
	da := openIn(a)
	defer da.Close()
	_, err := da.SnapshotCreateXML(pool.ctx, "vm", snapXML("s1"), driver.CreateDiskOnly)
	if !errors.Is(err, driver.ErrOperationInvalid) || !strings.Contains(err.Error(), "vm2") {
		t.Fatalf("snapshot of a disk another folder's domain writes: %v", err)
	}
	pool.expectFiles("x.qcow2")
}

// TestOpenWorldUserImageStaysTheUsers: a merge down into the user's
// image does not make it xlsnap's: a later pull-up out of it still ends
// on the user's name, and the user's file is never removed.
func TestOpenWorldUserImageStaysTheUsers(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.write("a.qcow2", 0x31, 0, 2048)
	w.define("vm", "", vdisk{"xvda", "a.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.write("a.s1", 0x32, 0, 64)
	w.snap("vm", "s2")
	w.write("a.s2", 0x33, 0, 8192)
	if r := w.del("vm", "s1", 0); r.Disks[0].Action != driver.ActionMergedDown {
		t.Fatalf("report %+v", r.Disks)
	}
	if r := w.del("vm", "s2", 0); r.Disks[0].Kept != w.path("a.qcow2") {
		t.Fatalf("report %+v", r.Disks)
	}
	w.expectFiles("a.qcow2")
	if got := w.source("vm", "xvda"); got != w.path("a.qcow2") {
		t.Fatalf("disk on %s", got)
	}
	w.expect("a.qcow2", 0x33, 0, 8192)
}

// TestOpenWorldRawBaseKeepsItsFormat: an external snapshot over the
// user's raw image, deleted: the raw file stays raw (a qcow2 under its
// name would be read as raw data by whatever else opens it).
func TestOpenWorldRawBaseKeepsItsFormat(t *testing.T) {
	w := newWorld(t)
	run(t, "qemu-img", "create", "-q", "-f", "raw", w.path("a.raw"), diskSize)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x41 0 1M", w.path("a.raw"))
	doc := oneDiskXML("vm", fileDisk("xvda", w.path("a.raw"), "raw"))
	if err := os.WriteFile(w.path("vm.xml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	w.open()
	w.snap("vm", "s1")
	w.write("a.s1", 0x42, 0, 4096) // bigger than the base: a pull-up would be cheaper
	w.del("vm", "s1", 0)
	out := run(t, "qemu-img", "info", "--output=json", w.path("a.raw"))
	if !strings.Contains(out, `"format": "raw"`) {
		t.Fatalf("a.raw is no longer raw:\n%s", out)
	}
	run(t, "qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 0 4M", w.path("a.raw"))
	if got := w.source("vm", "xvda"); got != w.path("a.raw") {
		t.Fatalf("disk on %s", got)
	}
}

// TestOpenWorldRevertOntoAnotherDomainsDisk: xvdb left vm and its image
// became web2's disk; a revert that would put vm's xvdb back on top of
// it (web2 writing underneath) is refused and changes nothing.
func TestOpenWorldRevertOntoAnotherDomainsDisk(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.image("b.qcow2", "")
	w.define("vm", "", vdisk{"xvda", "a.qcow2"}, vdisk{"xvdb", "b.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.define("vm", "", vdisk{"xvda", "a.s1"})
	w.define("web2", "", vdisk{"xvda", "b.qcow2"})
	before := w.files()
	err := w.d.RevertToSnapshot(w.ctx, "vm", "s1", 0)
	if !errors.Is(err, driver.ErrOperationInvalid) || !strings.Contains(err.Error(), "web2") {
		t.Fatalf("revert onto web2's disk: %v", err)
	}
	if got := w.files(); !slices.Equal(got, before) {
		t.Fatalf("the refused revert changed the folder: %v -> %v", before, got)
	}
}

// TestOpenWorldTwoDisksOneFile: two writable disks of one definition on
// one file are refused like two disks on one target.
func TestOpenWorldTwoDisksOneFile(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.define("vm", "", vdisk{"xvda", "a.qcow2"}, vdisk{"xvdb", "a.qcow2"})
	w.open()
	_, err := w.d.SnapshotCreateXML(w.ctx, "vm", snapXML("s1"), driver.CreateDiskOnly)
	if !errors.Is(err, driver.ErrXML) || driver.Code(err) != driver.ErrNumXML {
		t.Fatalf("two disks on one file: %v", err)
	}
	w.expectFiles("a.qcow2")
}

// TestOpenWorldTwoDisksOneNewOverlay: two disks of one snapshot named
// onto one new file are refused before anything is made.
func TestOpenWorldTwoDisksOneNewOverlay(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.image("b.qcow2", "")
	w.define("vm", "", vdisk{"xvda", "a.qcow2"}, vdisk{"xvdb", "b.qcow2"})
	w.open()
	same := w.path("same.qcow2")
	doc := fmt.Sprintf(`<domainsnapshot><name>s1</name><disks><disk name='xvda' snapshot='external'><source file='%s'/></disk><disk name='xvdb' snapshot='external'><source file='%s'/></disk></disks></domainsnapshot>`, same, same)
	_, err := w.d.SnapshotCreateXML(w.ctx, "vm", doc, driver.CreateDiskOnly)
	if !errors.Is(err, driver.ErrInvalidArg) || !strings.Contains(err.Error(), "both write") {
		t.Fatalf("two disks on one new overlay: %v", err)
	}
	w.expectFiles("a.qcow2", "b.qcow2")
}

// TestOpenWorldMovedBaseCloneLeftBehind: vm's base, which a linked clone
// also reads, is moved by hand and only vm's overlay repointed. The
// clone's header names a file that is gone, so no one can tell who reads
// the moved file: the rescan taking in the move is refused, check
// reports users it cannot know, and every merge stops, so the moved
// file, the clone's only copy of its base, is never written. Once the
// clone is repointed too, the move is taken in and the merge keeps the
// base for the clone.
func TestOpenWorldMovedBaseCloneLeftBehind(t *testing.T) {
	w := newWorld(t)
	w.image("a.qcow2", "")
	w.write("a.qcow2", 0x11, 0, 1024)
	w.image("clone.qcow2", "a.qcow2")
	w.define("vm", "", vdisk{"xvda", "a.qcow2"})
	w.define("clone", "", vdisk{"xvda", "clone.qcow2"})
	w.open()
	w.snap("vm", "s1")
	w.write("a.s1", 0x55, 0, 1024)
	run(t, "mv", w.path("a.qcow2"), w.path("m.qcow2"))
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", w.path("m.qcow2"), w.path("a.s1"))
	err := w.d.ChainChanged(w.ctx, "vm", "xvda", driver.Move{From: w.path("a.qcow2"), To: w.path("m.qcow2")})
	if !errors.Is(err, driver.ErrChainBroken) || !strings.Contains(err.Error(), w.path("clone.qcow2")+" names "+w.path("a.qcow2")) {
		t.Fatalf("rescan --moved with the clone left behind: %v", err)
	}
	ps, err := w.d.Check(w.ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	unknown := false
	for _, p := range ps {
		unknown = unknown || p.Kind == driver.ProblemUsersUnknown && strings.Contains(p.Detail, w.path("clone.qcow2"))
	}
	if !unknown {
		t.Fatalf("check with the clone's backing gone: %+v", ps)
	}
	if _, err := w.d.Coalesce(w.ctx, "vm", 0); !errors.Is(err, driver.ErrChainBroken) {
		t.Fatalf("coalesce with the clone's backing gone: %v", err)
	}
	if _, err := w.d.SnapshotDelete(w.ctx, "vm", "s1", 0); !errors.Is(err, driver.ErrChainBroken) {
		t.Fatalf("snapshot-delete with the clone's backing gone: %v", err)
	}
	w.expect("m.qcow2", 0x11, 0, 1024)
	// The clone repointed: the move is taken in, and deleting s1 keeps
	// the base the clone reads.
	run(t, "qemu-img", "rebase", "-u", "-f", "qcow2", "-F", "qcow2", "-b", w.path("m.qcow2"), w.path("clone.qcow2"))
	if err := w.d.ChainChanged(w.ctx, "vm", "xvda", driver.Move{From: w.path("a.qcow2"), To: w.path("m.qcow2")}); err != nil {
		t.Fatalf("rescan --moved once the clone is repointed: %v", err)
	}
	w.del("vm", "s1", 0)
	if _, err := w.d.Coalesce(w.ctx, "vm", 0); err != nil {
		t.Fatal(err)
	}
	w.expect("m.qcow2", 0x11, 0, 1024)
	w.expect("clone.qcow2", 0x11, 0, 1024)
	w.expect(w.source("vm", "xvda"), 0x55, 0, 1024)
}

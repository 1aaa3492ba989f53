package integration

import (
	"crypto/sha256"
	"encoding/json"
	"encoding/xml"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// The tests in this file give xlsnap inputs that do not fit the images
// (or each other) and assert that each is refused with its typed error
// and libvirt code before anything changes: the definition byte for byte,
// every file of the pool, and storage's records.

// define replaces the test domain's definition with doc (given the
// domain's UUID, which libvirt needs to take it as the same domain).
func (e *env) define(doc string) {
	e.t.Helper()
	if e.kind == libvirtSource {
		doc = strings.Replace(doc, "</name>", "</name>\n  <uuid>"+e.definition().UUID+"</uuid>", 1)
	}
	e.setDefinition(doc)
}

// oneDiskXML is a domain with the given <disk> elements.
func oneDiskXML(name string, disks ...string) string {
	return fmt.Sprintf("<domain type='test'>\n  <name>%s</name>\n  <memory unit='MiB'>64</memory>\n  <os>\n    <type>hvm</type>\n  </os>\n  <devices>\n%s  </devices>\n</domain>\n",
		name, strings.Join(disks, ""))
}

// fileDisk is a <disk> of a file; format "" leaves out <driver>.
func fileDisk(target, path, format string) string {
	drv := ""
	if format != "" {
		drv = fmt.Sprintf("      <driver name='qemu' type='%s'/>\n", format)
	}
	return fmt.Sprintf("    <disk type='file' device='disk'>\n%s      <source file='%s'/>\n      <target dev='%s' bus='virtio'/>\n    </disk>\n", drv, path, target)
}

// state is everything a refused call must leave as it was: the
// definition, the name and content of every file in the pool, storage's
// record and the snapshot list.
type state struct {
	def     string
	files   map[string][32]byte
	rec     string
	snaps   []string
	current string
}

func (e *env) state() state {
	e.t.Helper()
	e.d.DiskList(e.ctx, e.dom) // the first call records the domain: not the refusal's doing
	s := state{def: e.definitionXML(), files: map[string][32]byte{}}
	for _, f := range e.poolFiles() {
		if st, err := os.Lstat(e.path(f)); err != nil || !st.Mode().IsRegular() {
			s.files[f] = [32]byte{} // a folder or link: its name is what counts
			continue
		}
		b, err := os.ReadFile(e.path(f))
		if err != nil {
			e.t.Fatal(err)
		}
		s.files[f] = sha256.Sum256(b)
	}
	if rec, err := e.d.Storage().Domain(e.ctx, e.dom); err == nil {
		b, _ := json.Marshal(rec)
		s.rec = string(b)
		s.current = rec.Current
	}
	if list, err := e.d.Storage().Snapshots(e.ctx, e.dom); err == nil {
		s.snaps = []string{}
		for _, r := range list {
			s.snaps = append(s.snaps, r.Name)
		}
	}
	return s
}

func (e *env) expectUnchanged(before state) {
	e.t.Helper()
	after := e.state()
	if after.def != before.def {
		e.t.Fatalf("the definition changed:\n%s\nwas\n%s", after.def, before.def)
	}
	if len(after.files) != len(before.files) {
		e.t.Fatalf("the pool holds %v, held %v", mapKeys(after.files), mapKeys(before.files))
	}
	for f, h := range before.files {
		if ah, ok := after.files[f]; !ok || ah != h {
			e.t.Fatalf("%s changed or went", f)
		}
	}
	if after.rec != before.rec || after.current != before.current || !slices.Equal(after.snaps, before.snaps) {
		e.t.Fatalf("storage's record changed:\n%s %v\nwas\n%s %v", after.rec, after.snaps, before.rec, before.snaps)
	}
}

func mapKeys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	slices.Sort(out)
	return out
}

// imageInfo is qemu-img's view of one image, read as format.
type imageInfo struct {
	Format        string `json:"format"`
	VirtualSize   int64  `json:"virtual-size"`
	BackingFile   string `json:"backing-filename"`
	BackingFormat string `json:"backing-filename-format"`
}

func infoOf(t *testing.T, path, format string) imageInfo {
	t.Helper()
	var info imageInfo
	out := run(t, "qemu-img", "info", "--output=json", "-U", "-f", format, path)
	if err := json.Unmarshal([]byte(out), &info); err != nil {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	return info
}

// TestInputReuseMismatch: REUSE_EXT takes an overlay only if it fits the
// disk: qcow2, backed by the disk's active image under that image's own
// format, with the disk's size. An overlay made with -F raw over a qcow2
// image would have the guest read qcow2 metadata as its disk; a smaller
// one would cut the disk's tail. Each is VIR_ERR_INVALID_ARG and changes
// nothing; the overlay that fits is then taken and its data read back.
func TestInputReuseMismatch(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		vda := e.path("vda.qcow2")
		qimg := func(args ...string) { run(t, "qemu-img", append([]string{"create", "-q"}, args...)...) }
		qimg("-f", "qcow2", "-F", "raw", "-b", vda, e.path("rawfmt.qcow2"), diskSize)
		qimg("-f", "qcow2", "-F", "qcow2", "-b", vda, e.path("small.qcow2"), "8M")
		qimg("-f", "qcow2", "-F", "qcow2", "-b", vda, e.path("big.qcow2"), "32M")
		qimg("-f", "qcow2", "-F", "qcow2", "-b", e.path("vdb.qcow2"), e.path("other.qcow2"), diskSize)
		qimg("-f", "raw", e.path("plain.img"), diskSize)
		qimg("-f", "qcow2", e.path("nobacking.qcow2"), diskSize)
		doc := func(file string) string {
			return `<domainsnapshot><name>s1</name><disks>
				<disk name='vda' snapshot='external'><source file='` + e.path(file) + `'/></disk>
				<disk name='vdb' snapshot='no'/>
			</disks></domainsnapshot>`
		}
		before := e.state()
		for file, says := range map[string]string{
			"rawfmt.qcow2":    "as raw",
			"small.qcow2":     "8388608 bytes",
			"big.qcow2":       "33554432 bytes",
			"other.qcow2":     "vdb.qcow2",
			"plain.img":       "not a usable qcow2",
			"nobacking.qcow2": "no backing file",
		} {
			t.Run(file, func(t *testing.T) {
				_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, doc(file), driver.CreateDiskOnly|driver.CreateReuseExt)
				expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
				if !strings.Contains(err.Error(), says) {
					t.Fatalf("error %q does not say what differs (%q)", err, says)
				}
			})
		}
		e.expectUnchanged(before)

		// The overlay that fits: its own data shows through once used.
		qimg("-f", "qcow2", "-F", "qcow2", "-b", vda, e.path("fits.qcow2"), diskSize)
		run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x3d %d %d", regionOff(3), regionLen), e.path("fits.qcow2"))
		e.create(doc("fits.qcow2"), driver.CreateDiskOnly|driver.CreateReuseExt)
		c := e.now["vda"]
		c[3] = 0x3d
		e.now["vda"] = c
		e.verify()
		if file, format := e.defDisk("vda"); file != e.path("fits.qcow2") || format != "qcow2" {
			t.Fatalf("vda is on %s (%s), want fits.qcow2", file, format)
		}
	})
}

// TestInputUntypedDiskIsRaw: a disk whose definition names no format is
// raw (libvirt's default when it may not probe), even when the guest's
// bytes begin with a qcow2 header naming another pool image. Reading the
// definition changes nothing in it; a snapshot's overlay reads the disk
// as raw; the guest keeps reading its own bytes, never the other image.
func TestInputUntypedDiskIsRaw(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		other, disk := e.path("other.qcow2"), e.path("guest.img")
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", other, diskSize)
		run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0xaa 0 %d", 4<<20), other)
		// The guest wrote a qcow2 image (backed by other.qcow2) onto its
		// raw disk, then data of its own further on.
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", other, disk, diskSize)
		if err := os.Truncate(disk, 16<<20); err != nil {
			t.Fatal(err)
		}
		run(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P 0x5b %d %d", regionOff(2), regionLen), disk)
		e.define(oneDiskXML(e.dom, fileDisk("xvda", disk, "")))
		def := e.definitionXML()

		for range 2 {
			list, err := e.d.DiskList(e.ctx, e.dom)
			if err != nil {
				t.Fatal(err)
			}
			if len(list) != 1 || list[0].Source != disk || list[0].Format != "raw" || !slices.Equal(list[0].Chain, []string{disk}) {
				t.Fatalf("DiskList: %+v, want %s raw, chain of itself", list, disk)
			}
			if got := e.definitionXML(); got != def {
				t.Fatalf("domblklist rewrote the definition:\n%s\nwas\n%s", got, def)
			}
		}
		if _, err := e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML("s1"), driver.CreateDiskOnly); err != nil {
			t.Fatal(err)
		}
		ov := e.path("guest.s1")
		info := infoOf(t, ov, "qcow2")
		if info.BackingFile != disk || info.BackingFormat != "raw" || info.VirtualSize != 16<<20 {
			t.Fatalf("overlay: %+v, want backed by %s as raw, 16 MiB", info, disk)
		}
		var d struct {
			Devices struct {
				Disks []struct {
					Driver struct {
						Type string `xml:"type,attr"`
					} `xml:"driver"`
					Source struct {
						File string `xml:"file,attr"`
					} `xml:"source"`
				} `xml:"disk"`
			} `xml:"devices"`
		}
		if err := xml.Unmarshal([]byte(e.definitionXML()), &d); err != nil {
			t.Fatal(err)
		}
		if len(d.Devices.Disks) != 1 || d.Devices.Disks[0].Source.File != ov || d.Devices.Disks[0].Driver.Type != "qcow2" {
			t.Fatalf("definition after the snapshot: %+v, want %s (qcow2)", d.Devices.Disks, ov)
		}
		// Through the overlay: the header's first byte ('Q'), the guest's
		// region, and zeros where other.qcow2 holds 0xaa.
		storagetest.ExpectImage(t, ov, "qcow2", 'Q', 0, 1)
		storagetest.ExpectImage(t, ov, "qcow2", 0x5b, regionOff(2), regionLen)
		storagetest.ExpectImage(t, ov, "qcow2", 0x00, regionOff(1), regionLen)
		storagetest.ExpectImage(t, ov, "qcow2", 0x00, regionOff(3), regionLen)
	})
}

// TestInputSnapshotDiskKinds: a snapshot disk whose source is a block
// device, a network volume or a folder is refused as
// libvirt's qemu driver refuses external inactive snapshots there
// (VIR_ERR_CONFIG_UNSUPPORTED); never replaced by a qcow2 file.
func TestInputSnapshotDiskKinds(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		before := e.state()
		for kind, disk := range map[string]string{
			"block":   `<disk name='vda' snapshot='external' type='block'><source dev='` + e.path("vda.dev") + `'/></disk>`,
			"network": `<disk name='vda' snapshot='external' type='network'><source protocol='nbd' name='vda'><host name='localhost' port='10809'/></source></disk>`,
			"dir":     `<disk name='vda' snapshot='external' type='dir'><source dir='` + e.pool + `'/></disk>`,
		} {
			for _, flags := range []driver.CreateFlags{driver.CreateDiskOnly, driver.CreateDiskOnly | driver.CreateReuseExt, driver.CreateRedefine} {
				t.Run(fmt.Sprintf("%s/%#x", kind, flags), func(t *testing.T) {
					doc := "<domainsnapshot><name>k1</name><disks>" + disk + "<disk name='vdb' snapshot='no'/></disks></domainsnapshot>"
					if flags&driver.CreateRedefine != 0 {
						// What libvirt requires of a redefined snapshot.
						doc = strings.Replace(doc, "<disks>", "<state>shutoff</state><creationTime>1700000000</creationTime><disks>", 1)
					}
					_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, doc, flags)
					expectErr(t, err, driver.ErrUnsupported, driver.ErrNumConfigUnsupported)
				})
			}
		}
		// A kind libvirt does not know is an XML error, with or without a
		// source (libvirtxml cannot read the source of an unknown kind).
		for _, disk := range []string{
			`<disk name='vda' snapshot='external' type='teleport'><source file='` + e.path("vda.tp") + `'/></disk>`,
			`<disk name='vda' snapshot='external' type='teleport'/>`,
		} {
			_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, "<domainsnapshot><name>k1</name><disks>"+disk+"</disks></domainsnapshot>", driver.CreateDiskOnly)
			expectErr(t, err, driver.ErrXML, driver.ErrNumXML)
		}
		e.expectUnchanged(before)
		e.finish()
	})
}

// TestInputDuplicateTargets: two disks with one target in a definition
// (libvirt's VIR_ERR_XML_ERROR): refused before storage records anything
// or the definition is rewritten. libvirt refuses such a definition
// itself, so only a folder of definitions can hold one.
func TestInputDuplicateTargets(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dirSource)
	e.define(oneDiskXML(e.dom, fileDisk("vda", e.path("vda.qcow2"), "qcow2"), fileDisk("vda", e.path("vdb.qcow2"), "qcow2")))
	before := e.state()
	_, err := e.d.DiskList(e.ctx, e.dom)
	expectErr(t, err, driver.ErrXML, driver.ErrNumXML)
	if !strings.Contains(err.Error(), "vdb.qcow2") {
		t.Fatalf("error %q does not name the second disk's source", err)
	}
	_, err = e.d.SnapshotCreateXML(e.ctx, e.dom, snapXML("s1"), driver.CreateDiskOnly)
	expectErr(t, err, driver.ErrXML, driver.ErrNumXML)
	_, err = e.d.Storage().Domain(e.ctx, e.dom)
	expectErr(t, err, driver.ErrNoDomain, driver.ErrNumNoDomain)
	e.expectUnchanged(before)
}

// TestInputSymlinkedFolder: a new overlay's real place must be in a pool.
// A folder inside the pool that links outside it, or a link at the
// overlay's own name, would put the guest's writes outside every pool.
func TestInputSymlinkedFolder(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		outside := t.TempDir()
		if err := os.Symlink(outside, e.path("linkdir")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(outside, "target"), e.path("dangling")); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(filepath.Join(outside, "later"), e.path("danglingdir")); err != nil {
			t.Fatal(err)
		}
		before := e.state()
		for what, file := range map[string]string{
			"folder":       e.path("linkdir/ov"),
			"dangling":     e.path("dangling"),
			"folder-above": e.path("linkdir/../linkdir/ov"),
			"dangling-dir": e.path("danglingdir/ov"),
			"below-link":   e.path("linkdir/missing/ov"),
		} {
			t.Run(what, func(t *testing.T) {
				_, err := e.d.CreateSnapshot(e.ctx, e.dom, driver.SnapshotRequest{Name: "s1", Disks: []driver.DiskRequest{
					{Name: "vda", External: true, ExternalPath: file}, {Name: "vdb", Skip: true}}}, driver.CreateDiskOnly)
				expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
			})
		}
		if entries, _ := os.ReadDir(outside); len(entries) != 0 {
			t.Fatalf("files made outside the pool: %v", entries)
		}
		e.expectUnchanged(before)
		// A real folder inside the pool is fine.
		if err := os.Mkdir(e.path("sub"), 0o755); err != nil {
			t.Fatal(err)
		}
		if _, err := e.d.CreateSnapshot(e.ctx, e.dom, driver.SnapshotRequest{Name: "s1", Disks: []driver.DiskRequest{
			{Name: "vda", External: true, ExternalPath: e.path("sub/ov")}, {Name: "vdb", Skip: true}}}, driver.CreateDiskOnly); err != nil {
			t.Fatal(err)
		}
		expectRegions(t, e.path("sub/ov"), "qcow2", e.now["vda"])
	})
}

// TestInputNames: snapshot and domain names follow libvirt's rules (no
// leading '.', no '/': libvirt's VIR_ERR_XML_DETAIL for a snapshot) and
// xlsnap's (no control characters, at most 255 bytes: invalid argument),
// and a snapshot document is one root element of at most 10 MiB (else not
// well-formed, VIR_ERR_XML_DETAIL as libvirt's parser reports it).
func TestInputNames(t *testing.T) {
	both(t, nil, func(t *testing.T, e *env) {
		e.write(0)
		before := e.state()
		for _, name := range []string{".hidden", "a/b", "line\nbreak", "tab\t", "bell\x07", strings.Repeat("n", 256)} {
			t.Run(fmt.Sprintf("snapshot/%q", name), func(t *testing.T) {
				sentinel, code := driver.ErrInvalidArg, driver.ErrNumInvalidArg
				if strings.HasPrefix(name, ".") || strings.Contains(name, "/") {
					sentinel, code = errdefs.ErrXMLDetail, driver.ErrorNumber(errdefs.CodeXMLDetail)
				}
				_, err := e.d.CreateSnapshot(e.ctx, e.dom, driver.SnapshotRequest{Name: name}, driver.CreateDiskOnly)
				expectErr(t, err, sentinel, code)
				var doc strings.Builder
				xml.EscapeText(&doc, []byte(name))
				_, err = e.d.SnapshotCreateXML(e.ctx, e.dom, "<domainsnapshot><name>"+doc.String()+
					"</name><state>shutoff</state><creationTime>1700000000</creationTime></domainsnapshot>", driver.CreateRedefine)
				expectErr(t, err, sentinel, code)
			})
			t.Run(fmt.Sprintf("domain/%q", name), func(t *testing.T) {
				_, err := e.d.ListAllSnapshots(e.ctx, name, 0)
				expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
				_, err = e.d.DiskList(e.ctx, name)
				expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)
			})
		}
		// A name whose overlay's file name would be too long.
		_, err := e.d.CreateSnapshot(e.ctx, e.dom, driver.SnapshotRequest{Name: strings.Repeat("n", 252)}, driver.CreateDiskOnly)
		expectErr(t, err, driver.ErrInvalidArg, driver.ErrNumInvalidArg)

		huge := "<domainsnapshot><name>h</name><description>" + strings.Repeat("x", driver.MaxSnapshotXML) + "</description></domainsnapshot>"
		for what, doc := range map[string]string{
			"huge":           huge,
			"second root":    "<domainsnapshot><name>x1</name></domainsnapshot><domainsnapshot><name>x2</name></domainsnapshot>",
			"text after":     "<domainsnapshot><name>x1</name></domainsnapshot>trailing",
			"element after":  "<domainsnapshot><name>x1</name></domainsnapshot>\n<!-- c --><x/>",
			"unclosed after": "<domainsnapshot><name>x1</name></domainsnapshot><x>",
		} {
			t.Run("xml/"+what, func(t *testing.T) {
				_, err := e.d.SnapshotCreateXML(e.ctx, e.dom, doc, driver.CreateDiskOnly)
				expectErr(t, err, errdefs.ErrXMLDetail, driver.ErrorNumber(errdefs.CodeXMLDetail))
			})
		}
		e.expectUnchanged(before)
		// Whitespace and comments after the root are not content.
		e.create("<?xml version='1.0'?>\n<domainsnapshot><name>ok.1</name></domainsnapshot>\n<!-- end -->\n\n", driver.CreateDiskOnly)
		e.expectChain("vda", "vda.ok.1", "vda.qcow2")
		e.finish()
	})
}

// TestInputRelativePaths: in a folder of definitions a relative disk path
// means the definition file's folder, whatever folder xlsnap runs in; the
// rewritten definition keeps its file's mode and owner, and a new overlay
// takes the mode and owner of the image it covers.
func TestInputRelativePaths(t *testing.T) {
	t.Parallel()
	e := newEnv(t, dirSource, diskDef{Target: "vda"})
	rel, err := filepath.Rel(e.defDir, e.path("vda.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if wd, _ := os.Getwd(); filepath.Join(wd, rel) == e.path("vda.qcow2") {
		t.Fatal("the working folder is the definitions' folder: the test would prove nothing")
	}
	e.define(oneDiskXML(e.dom, fileDisk("vda", rel, "qcow2")))
	defFile := filepath.Join(e.defDir, e.dom+".xml")
	uid, gid := os.Getuid(), os.Getgid()
	if uid == 0 {
		uid, gid = 65534, 65534
	}
	for _, f := range []string{defFile, e.path("vda.qcow2")} {
		if err := os.Chown(f, uid, gid); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(f, 0o640); err != nil {
			t.Fatal(err)
		}
	}
	def := e.definitionXML()
	list, err := e.d.DiskList(e.ctx, e.dom)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Source != e.path("vda.qcow2") {
		t.Fatalf("DiskList: %+v, want %s", list, e.path("vda.qcow2"))
	}
	if got := e.definitionXML(); got != def {
		t.Fatalf("domblklist rewrote the definition:\n%s", got)
	}
	// The definition's path is relative: write where it leads.
	run(t, "qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x21 %d %d", regionOff(0), regionLen), e.path("vda.qcow2"))
	e.now["vda"] = content{0: 0x21}
	e.snap("s1", driver.CreateDiskOnly)
	e.expectChain("vda", "vda.s1", "vda.qcow2")
	// The rewritten definition names the new image the user's way.
	if want := filepath.Join(filepath.Dir(rel), "vda.s1"); !strings.Contains(e.definitionXML(), "file=\""+want+"\"") {
		t.Fatalf("the definition does not name %s relative:\n%s", want, e.definitionXML())
	}
	for _, f := range []string{defFile, e.path("vda.s1")} {
		st, err := os.Stat(f)
		if err != nil {
			t.Fatal(err)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if st.Mode().Perm() != 0o640 || int(sys.Uid) != uid || int(sys.Gid) != gid {
			t.Fatalf("%s: mode %v owner %d:%d, want 0640 %d:%d", f, st.Mode().Perm(), sys.Uid, sys.Gid, uid, gid)
		}
	}
	e.write(1)
	e.revert("s1", 0)
	e.finish()
}

package libvirt_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/xenlight"
	xlvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
)

// TestSessionDaemonCheckpoints: on a real QEMU domain of a libvirt session
// daemon, a snapshot with no flags is a full system checkpoint (issue
// #12): state running, its memory saved (beside the disk when the XML
// names no file), the domain running again afterwards; and an explicit
// memspec works too, with internal and with external disks, the restored
// domain writing to the new overlay.
func TestSessionDaemonCheckpoints(t *testing.T) {
	h, dir := xlvirt.SessionDaemon(t)
	ctx := context.Background()
	img := filepath.Join(dir, "vda.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, "64M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v\n%s", err, out)
	}
	if os.Getuid() == 0 {
		// The daemon runs as nobody and writes the images and the memory.
		for _, p := range []string{dir, img} {
			if err := os.Lchown(p, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}
	}
	dom, err := h.Conn().DomainDefineXML(xlvirt.QEMUDomainXML("ckpt", "6d2e8b47-3a91-4c5f-8e07-b1c4d9f2a365", img))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { dom.Destroy(); dom.Undefine(); dom.Free() }()
	if err := dom.Create(); err != nil {
		t.Fatal(err)
	}
	src, err := libvirtsource.Open("qemu+unix:///session?socket=" + filepath.Join(filepath.Dir(dir), "run", "libvirt", "libvirt-sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	d, err := driver.Open(ctx, driver.Config{StateDir: t.TempDir(), Source: src, Pools: []string{dir}, Hypervisor: h})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()

	check := func(name, doc, memory string) *driver.Snapshot {
		t.Helper()
		s, err := d.SnapshotCreateXML(ctx, "ckpt", doc, 0)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if s.State != "running" || s.Memory != memory {
			t.Fatalf("%s: state %s, memory %q; want running, %q", name, s.State, s.Memory, memory)
		}
		if fi, err := os.Stat(memory); err != nil || fi.Size() == 0 {
			t.Fatalf("%s: memory image: %v", name, err)
		}
		if st, err := h.State(ctx, "ckpt"); err != nil || st != xenlight.Running {
			t.Fatalf("%s: the domain is %s (%v) after its checkpoint", name, st, err)
		}
		x, err := d.SnapshotGetXMLDesc(ctx, "ckpt", name, 0)
		if err != nil || !strings.Contains(x, "<memory snapshot='external' file='"+memory+"'/>") {
			t.Fatalf("%s: dumpxml %v:\n%s", name, err, x)
		}
		return s
	}
	check("c1", "<domainsnapshot><name>c1</name></domainsnapshot>", filepath.Join(dir, "ckpt.c1.mem"))
	mem := filepath.Join(dir, "c2.mem")
	check("c2", "<domainsnapshot><name>c2</name><memory snapshot='external' file='"+mem+"'/></domainsnapshot>", mem)
	mem = filepath.Join(dir, "c3.mem")
	s := check("c3", "<domainsnapshot><name>c3</name><memory snapshot='external' file='"+mem+"'/><disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>", mem)
	overlay := s.Disks[0].Overlay
	live, err := dom.GetXMLDesc(0)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(live, "<source file='"+overlay+"'") {
		t.Fatalf("the restored domain does not write to the new overlay %s:\n%s", overlay, live)
	}
}

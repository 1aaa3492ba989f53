package live

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	lv "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/storage/storagetest"
	xlvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
)

// runningTestDomain defines and starts, on libvirt's test driver, a
// domain named prefix and this process's id whose one disk vda is the
// qcow2 image img, and opens a driver on it with pool as its storage
// pool; the driver, the domain and the connection are closed when the
// test ends.
func runningTestDomain(t *testing.T, prefix, pool, img string) (string, *lv.Domain, *driver.Driver) {
	t.Helper()
	src, err := libvirtsource.Open("test:///default")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	name := fmt.Sprintf("%s%d", prefix, os.Getpid())
	def := fmt.Sprintf(`<domain type='test'><name>%s</name><memory>131072</memory><os><type>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='vda'/></disk>
</devices></domain>`, name, img)
	dom, err := src.Conn().DomainDefineXML(def)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dom.Destroy(); dom.Undefine(); dom.Free() })
	if err := dom.Create(); err != nil {
		t.Fatal(err)
	}
	d, err := driver.Open(context.Background(), driver.Config{StateDir: t.TempDir(), Source: src, Pools: []string{pool}, Hypervisor: xlvirt.New(src.Conn())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return name, dom, d
}

// TestMemorySnapshotThroughLibvirt takes a memory + disk snapshot of a
// running domain on libvirt's test driver, whose save always stops the
// domain: save, snapshot the disks, restore onto the new overlays. The
// restored domain must write to the overlay (a restore that reopened the
// old disk would silently drop everything written since). Then a revert
// restores the memory image onto the reverted disks, running or paused.
func TestMemorySnapshotThroughLibvirt(t *testing.T) {
	ctx := context.Background()
	pool := t.TempDir()
	img := filepath.Join(pool, "mem-vda.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", img)
	name, dom, d := runningTestDomain(t, "memvm", pool, img)

	mem := filepath.Join(pool, "mem.s1")
	snap, err := d.SnapshotCreateXML(ctx, name, fmt.Sprintf(`<domainsnapshot><name>s1</name>
<memory snapshot='external' file='%s'/><disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>`, mem), 0)
	if err != nil {
		t.Fatal(err)
	}
	if snap.Memory != mem || snap.State != "running" {
		t.Fatalf("snapshot %+v", snap)
	}
	overlay := filepath.Join(pool, "mem-vda.s1")
	liveDisk := func() string {
		t.Helper()
		doc, err := dom.GetXMLDesc(0)
		if err != nil {
			t.Fatal(err)
		}
		var x libvirtxml.Domain
		if err := x.Unmarshal(doc); err != nil {
			t.Fatal(err)
		}
		return x.Devices.Disks[0].Source.File.File
	}
	state := func() lv.DomainState {
		t.Helper()
		st, _, err := dom.GetState()
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	if state() != lv.DOMAIN_RUNNING || liveDisk() != overlay {
		t.Fatalf("after the memory snapshot: state %v, the running domain writes %s, want %s", state(), liveDisk(), overlay)
	}
	if st, err := os.Stat(mem); err != nil || st.Size() == 0 {
		t.Fatalf("memory image: %v", err)
	}
	// The guest writes after the snapshot.
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x62 0 1M", overlay)

	// Revert: destroy, revert the disks, restore the memory onto them.
	if err := d.RevertToSnapshot(ctx, name, "s1", 0); err != nil {
		t.Fatal(err)
	}
	reverted := filepath.Join(pool, "mem-vda.s1-1")
	if state() != lv.DOMAIN_RUNNING || liveDisk() != reverted {
		t.Fatalf("after the revert: state %v, disk %s, want %s", state(), liveDisk(), reverted)
	}
	storagetest.ExpectImage(t, reverted, "qcow2", 0x61, 0, 1<<20)
	if err := d.RevertToSnapshot(ctx, name, "s1", driver.RevertPaused); err != nil {
		t.Fatal(err)
	}
	if state() != lv.DOMAIN_PAUSED {
		t.Fatalf("revert --paused left the domain %v", state())
	}
	problems, err := d.Storage().Check(ctx)
	if err != nil || len(problems) != 0 {
		t.Fatalf("check: %+v %v", problems, err)
	}
}

package live

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

// TestLiveMemoryUnsupportedChangesNothing: libvirt's drivers behind
// xenlight/libvirt have no checkpoint save, so memory and disks cannot be
// taken at one instant while the guest runs. LIVE with memory is then
// ErrLiveUnsupported (84) before any change: no memory image, no
// snapshot, no new layer, the domain running on its old disk. A non-live
// or an inconsistent snapshot would be the silent alternative.
func TestLiveMemoryUnsupportedChangesNothing(t *testing.T) {
	ctx := context.Background()
	pool := t.TempDir()
	img := filepath.Join(pool, "lm-vda.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", img)
	name, dom, d := runningTestDomain(t, "livemem", pool, img)

	mem := filepath.Join(pool, "lm.mem")
	doc := fmt.Sprintf(`<domainsnapshot><name>l1</name><memory snapshot='external' file='%s'/></domainsnapshot>`, mem)
	_, err := d.SnapshotCreateXML(ctx, name, doc, driver.CreateLive)
	if !errors.Is(err, errdefs.ErrLiveUnsupported) || driver.Code(err) != errdefs.CodeOperationUnsupported {
		t.Fatalf("LIVE with memory through libvirt: %v (code %d), want ErrLiveUnsupported (%d)", err, driver.Code(err), errdefs.CodeOperationUnsupported)
	}
	if _, err := os.Lstat(mem); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refused snapshot left a memory image: %v", err)
	}
	if list, err := d.ListAllSnapshots(ctx, name, 0); err != nil || len(list) != 0 {
		t.Fatalf("snapshots after the refusal: %v, %v", list, err)
	}
	entries, err := os.ReadDir(pool)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if len(names) != 1 || names[0] != "lm-vda.qcow2" {
		t.Fatalf("pool after the refusal: %v, want only lm-vda.qcow2", names)
	}
	if st, _, err := dom.GetState(); err != nil || st != lv.DOMAIN_RUNNING {
		t.Fatalf("domain after the refusal: %v, %v; want running", st, err)
	}
	disks, err := d.DiskList(ctx, name)
	if err != nil || len(disks) != 1 || disks[0].Source != img {
		t.Fatalf("disks after the refusal: %+v, %v; want vda on %s", disks, err, img)
	}
}

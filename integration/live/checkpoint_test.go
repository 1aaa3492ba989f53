package live

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

// TestRunningDefaultIsCheckpoint: a snapshot of a running domain with no
// flags is a full system checkpoint, as in libvirt, never a silent
// disk-only one (issue #12). A bare device model holds no Xen guest
// memory, so it is ErrLiveUnsupported (84) before anything changes: no
// file, no record, no pause; DISK_ONLY still takes the disks alone.
func TestRunningDefaultIsCheckpoint(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x71, 0)
	before := e.files()
	for _, doc := range []string{
		"<domainsnapshot><name>c1</name></domainsnapshot>",
		"<domainsnapshot><name>c1</name><memory snapshot='internal'/></domainsnapshot>",
	} {
		_, err := e.d.SnapshotCreateXML(e.ctx, "vm", doc, 0)
		if !errors.Is(err, errdefs.ErrLiveUnsupported) || errdefs.CodeOf(err) != errdefs.CodeOperationUnsupported {
			t.Fatalf("%s on a bare device model: %v (code %d), want ErrLiveUnsupported (84)", doc, err, errdefs.CodeOf(err))
		}
	}
	if after := e.files(); !slices.Equal(after, before) {
		t.Fatalf("the refused checkpoint changed the folder: %v -> %v", before, after)
	}
	if list, err := e.d.ListAllSnapshots(e.ctx, "vm", 0); err != nil || len(list) != 0 {
		t.Fatalf("snapshots after the refusal: %v %v", list, err)
	}
	e.expectChains()
	e.expect("xvda", 0x71, 0)
	s, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>d1</name></domainsnapshot>", driver.CreateDiskOnly)
	if err != nil || s.State != "disk-snapshot" {
		t.Fatalf("DISK_ONLY: %+v %v", s, err)
	}
}

// TestDefaultCheckpointThroughLibvirt: on libvirt's test driver, whose
// save stops the domain, a running domain's snapshot with no flags and
// no memory element saves its memory beside its first disk, records state
// running with that memory file (dumpxml says so), and leaves the domain
// running on the snapshot's disks.
func TestDefaultCheckpointThroughLibvirt(t *testing.T) {
	pool := t.TempDir()
	img := filepath.Join(pool, "ck-vda.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	name, dom, d := runningTestDomain(t, "ckvm", pool, img)
	snap, err := d.SnapshotCreateXML(t.Context(), name, "<domainsnapshot><name>c1</name></domainsnapshot>", 0)
	if err != nil {
		t.Fatal(err)
	}
	mem := filepath.Join(pool, name+".c1.mem")
	if snap.State != "running" || snap.Memory != mem {
		t.Fatalf("snapshot state %s, memory %q; want running, %s", snap.State, snap.Memory, mem)
	}
	if fi, err := os.Stat(mem); err != nil || fi.Size() == 0 {
		t.Fatalf("memory image: %v", err)
	}
	if st, _, err := dom.GetState(); err != nil || st != lv.DOMAIN_RUNNING {
		t.Fatalf("domain state %v %v after the checkpoint", st, err)
	}
	x, err := d.SnapshotGetXMLDesc(t.Context(), name, "c1", 0)
	if err != nil || !strings.Contains(x, "<state>running</state>") || !strings.Contains(x, "<memory snapshot='external' file='"+mem+"'/>") {
		t.Fatalf("dumpxml %v:\n%s", err, x)
	}
}

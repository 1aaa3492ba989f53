//go:build xen && libxl

package xen

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/libxl"
)

// xmlRestore is the in-test bridge between the driver and the libxl back
// end for restores: the driver hands Restore the domain's libvirt XML,
// libxl takes only its own JSON configuration (and refuses XML with
// ErrUnsupported). It keeps the libxl configuration each save was made
// from and repoints its disks at the XML's sources.
type xmlRestore struct {
	*libxl.Hypervisor
	mu   sync.Mutex
	defs map[string]string // memory image -> libxl JSON at save time
}

var _ xenlight.Hypervisor = (*xmlRestore)(nil)

func (a *xmlRestore) SaveMemory(ctx context.Context, domain, path string, checkpoint bool) error {
	def, err := a.Definition(ctx, domain)
	if err != nil {
		return err
	}
	a.mu.Lock()
	a.defs[path] = def
	a.mu.Unlock()
	return a.Hypervisor.SaveMemory(ctx, domain, path, checkpoint)
}

func (a *xmlRestore) Restore(ctx context.Context, domain, path, definition string, paused bool) error {
	if !strings.HasPrefix(strings.TrimSpace(definition), "<") {
		return a.Hypervisor.Restore(ctx, domain, path, definition, paused)
	}
	a.mu.Lock()
	base, ok := a.defs[path]
	a.mu.Unlock()
	if !ok {
		return fmt.Errorf("no libxl configuration saved with %s", path)
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(definition); err != nil {
		return err
	}
	disks := map[string]libxl.Disk{}
	for _, d := range dom.Devices.Disks {
		if d.Source == nil || d.Source.File == nil || d.Target == nil {
			continue
		}
		disk := libxl.Disk{Path: d.Source.File.File}
		if d.Driver != nil {
			disk.Format = d.Driver.Type
		}
		disks[d.Target.Dev] = disk
	}
	def, err := libxl.RepointDisks(base, disks)
	if err != nil {
		return err
	}
	return a.Hypervisor.Restore(ctx, domain, path, def, paused)
}

// TestMemorySnapshotAndRevert: a memory + disk snapshot taken as a
// checkpoint (the guest keeps running), then reverts with memory, running
// and paused, through the driver on the libxl back end.
func TestMemorySnapshotAndRevert(t *testing.T) {
	ctx := context.Background()
	g := newGuest(t, "g3")
	g.start(nil)
	h := newLibxl(t)

	// What the driver on the bare libxl back end does with a restore.
	err := h.Restore(ctx, g.name, "/nonexistent", "<domain/>", false)
	t.Logf("libxl Restore given libvirt XML (what the driver passes): %v (ErrUnsupported: %v)", err, errors.Is(err, errors.ErrUnsupported))
	a := &xmlRestore{Hypervisor: h, defs: map[string]string{}}
	d := g.openDriver(a)

	mem := filepath.Join(workDir, g.name, "m1.mem")
	overlays := map[string]string{}
	req := driver.SnapshotRequest{Name: "m1", Memory: true, MemoryPath: mem}
	for _, disk := range disks {
		overlays[disk] = filepath.Join(g.dir, disk+".m1.qcow2")
		req.Disks = append(req.Disks, driver.DiskRequest{Name: disk, External: true, ExternalFormat: "qcow2", ExternalPath: overlays[disk]})
	}
	t0 := time.Now()
	snap, err := d.CreateSnapshot(ctx, g.name, req, 0)
	if err != nil {
		t.Fatalf("memory snapshot: %v\n%s", err, g.console())
	}
	timing(t, "case 5: memory+disk snapshot (checkpoint)", t0)
	if st, _ := h.State(ctx, g.name); st != xenlight.Running {
		t.Fatalf("after the checkpoint the domain is %s, want running", st)
	}
	t.Logf("snapshot m1: state %s, memory %s", snap.State, snap.Memory)
	chains := g.chains(h)
	frozen := 0
	for _, disk := range disks {
		g.expectChain(chains, overlays[disk], g.base[disk])
		frozen, _ = records(t, g.base[disk], disk, true)
		g.waitSeq(overlays[disk], disk, frozen+3)
	}

	revert := func(what string, flags driver.RevertFlags, want xenlight.State) map[string]string {
		t.Helper()
		t0 := time.Now()
		if err := d.RevertToSnapshot(ctx, g.name, "m1", flags); err != nil {
			t.Fatalf("revert %s: %v\n%s", what, err, g.console())
		}
		timing(t, "case 6: revert with memory, "+what, t0)
		if st, _ := h.State(ctx, g.name); st != want {
			t.Fatalf("after the revert the domain is %s, want %s", st, want)
		}
		active := map[string]string{}
		chains := g.chains(h)
		for _, disk := range disks {
			di := g.diskList(d)[disk]
			active[disk] = di.Source
			g.expectChain(chains, di.Source, g.base[disk])
		}
		return active
	}
	active := revert("--running", driver.RevertRunning, xenlight.Running)
	for _, disk := range disks {
		g.waitSeq(active[disk], disk, frozen+3)
	}
	active = revert("--paused", driver.RevertPaused, xenlight.Paused)
	time.Sleep(3 * time.Second)
	for _, disk := range disks {
		// The restored guest has not run: its new layer holds nothing yet.
		if last, _ := records(t, active[disk], disk, true); last > frozen+1 {
			t.Fatalf("%s: paused guest's disk reads record %d, the snapshot was at %d", disk, last, frozen)
		}
	}
	if err := h.Resume(ctx, g.name); err != nil {
		t.Fatal(err)
	}
	after := 0
	for _, disk := range disks {
		after = g.waitSeq(active[disk], disk, frozen+3)
	}
	g.stop()
	for _, disk := range disks {
		expectRecords(t, active[disk], disk, after)
		run(t, "qemu-img", "check", "-q", g.base[disk])
	}
}

//go:build xen && libxl

package xen

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/xenlight"
)

// TestMemorySnapshotAndRevert: a memory + disk snapshot taken as a
// checkpoint (the guest keeps running), then reverts with memory, running
// and paused, through the driver on the libxl back end.
func TestMemorySnapshotAndRevert(t *testing.T) {
	ctx := context.Background()
	g := newGuest(t, "g3")
	g.start(nil)
	h := newLibxl(t)

	// The driver hands libxl's Restore the domain's libvirt XML; the
	// back end repoints the configuration saved in the image.
	d := g.openDriver(h)

	// Case 11 (PV): Debian's Xen 4.17 has no shadow paging (xl info:
	// virt_caps pv hvm hap), so it cannot track a PV guest's writes
	// while its memory is copied: LIVE with memory is refused before
	// anything changes.
	req0, _ := g.externalRequest("live0")
	mem0 := filepath.Join(workDir, g.name, "live0.mem")
	req0.Memory, req0.MemoryPath = true, mem0
	_, err := d.CreateSnapshot(ctx, g.name, req0, driver.CreateLive)
	if !errors.Is(err, errdefs.ErrLiveUnsupported) {
		t.Fatalf("LIVE with memory of a PV guest on a Xen without shadow paging: %v, want ErrLiveUnsupported", err)
	}
	t.Logf("case 11, PV guest: %v", err)
	if _, err := os.Lstat(mem0); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the refusal left a memory image: %v", err)
	}
	if list, err := d.ListAllSnapshots(ctx, g.name, 0); err != nil || len(list) != 0 {
		t.Fatalf("snapshots after the refusal: %v, %v", list, err)
	}
	for disk, di := range g.diskList(d) {
		if di.Source != g.base[disk] {
			t.Fatalf("%s after the refusal: %s, want %s", disk, di.Source, g.base[disk])
		}
	}
	if st, _ := h.State(ctx, g.name); st != xenlight.Running {
		t.Fatalf("the guest after the refusal is %s, want running", st)
	}

	mem := filepath.Join(workDir, g.name, "m1.mem")
	req, overlays := g.externalRequest("m1")
	req.Memory, req.MemoryPath = true, mem
	t0 := time.Now()
	snap, err := d.CreateSnapshot(ctx, g.name, req, 0)
	if err != nil {
		t.Fatalf("memory snapshot: %v\n%s", err, g.console())
	}
	timing(t, "case 5: memory+disk snapshot (checkpoint)", t0)
	if st, _ := h.State(ctx, g.name); st != xenlight.Running {
		t.Fatalf("after the checkpoint the domain is %s, want running", st)
	}
	if snap.State != "running" || snap.Memory != mem {
		t.Fatalf("snapshot m1: state %q, memory %q; want running, %s", snap.State, snap.Memory, mem)
	}
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

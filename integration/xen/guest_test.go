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
	"github.com/xlsnap/xlsnap/internal/crashpoint"
	"github.com/xlsnap/xlsnap/xenlight"
)

// crashIn runs op until the crash point (see crashpoint.Catch), which it
// must reach.
func crashIn(t *testing.T, point string, op func() error) {
	t.Helper()
	crashed, err := crashpoint.Catch(point, op)
	if err != nil {
		t.Fatalf("before %s: %v", point, err)
	}
	if !crashed {
		t.Fatalf("the operation never reached %s", point)
	}
}

// TestGuestStepsRecoverXen: the hypervisor steps of memory snapshots and
// reverts on a real Xen guest (libxl back end), interrupted: the next
// driver's first call resumes a guest a snapshot paused (removing the
// memory image no snapshot holds), restores one a revert stopped once
// the revert is done, and reports one whose revert was undone. The
// guest's numbered records go on after each.
func TestGuestStepsRecoverXen(t *testing.T) {
	ctx := context.Background()
	g := newGuest(t, "g6")
	g.start(nil)
	h := newLibxl(t)
	state := func() xenlight.State {
		t.Helper()
		st, err := h.State(ctx, g.name)
		if err != nil {
			t.Fatal(err)
		}
		return st
	}
	keepsWriting := func(d *driver.Driver) {
		t.Helper()
		for _, disk := range disks {
			src := g.diskList(d)[disk].Source
			last, _ := records(t, src, disk, true)
			g.waitSeq(src, disk, last+3)
		}
	}

	// A memory snapshot interrupted after the pause, and after the
	// checkpoint save: resumed, the memory image dropped.
	for i, point := range []string{"guest-snapshot/paused", "guest-snapshot/saved"} {
		d := g.openDriver(h)
		mem := filepath.Join(workDir, g.name, "crash.mem")
		req, _ := g.externalRequest("c" + string(rune('0'+i)))
		req.Memory, req.MemoryPath = true, mem
		crashIn(t, point, func() error { _, err := d.CreateSnapshot(ctx, g.name, req, 0); return err })
		if st := state(); st != xenlight.Paused {
			t.Fatalf("killed at %s: the guest is %s, want paused", point, st)
		}
		t0 := time.Now()
		d = g.openDriver(h)
		g.diskList(d) // the first call recovers
		timing(t, "case 9: recovery after a kill at "+point, t0)
		if st := state(); st != xenlight.Running {
			t.Fatalf("killed at %s, recovered: the guest is %s, want running", point, st)
		}
		if _, err := os.Stat(mem); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("killed at %s: the memory image no snapshot holds is still there: %v", point, err)
		}
		keepsWriting(d)
	}

	// A revert to a memory snapshot interrupted once its disks are done:
	// the guest comes back from the snapshot's memory on the new layers.
	d := g.openDriver(h)
	mem := filepath.Join(workDir, g.name, "m1.mem")
	req, _ := g.externalRequest("m1")
	req.Memory, req.MemoryPath = true, mem
	if _, err := d.CreateSnapshot(ctx, g.name, req, 0); err != nil {
		t.Fatalf("memory snapshot: %v\n%s", err, g.console())
	}
	crashIn(t, "guest-revert/disks-done", func() error { return d.RevertToSnapshot(ctx, g.name, "m1", 0) })
	if st := state(); st != xenlight.Shutoff {
		t.Fatalf("killed after the revert's disks: the guest is %s, want shut off", st)
	}
	d = g.openDriver(h)
	g.diskList(d)
	if st := state(); st != xenlight.Running {
		t.Fatalf("after recovery the guest is %s, want running (restored)\n%s", st, g.console())
	}
	keepsWriting(d)

	// Interrupted after the destroy, before its disks: the revert is
	// undone and the stopped guest reported, once.
	crashIn(t, "guest-revert/destroyed", func() error { return d.RevertToSnapshot(ctx, g.name, "m1", 0) })
	d = g.openDriver(h)
	if _, err := d.DiskList(ctx, g.name); !errors.Is(err, driver.ErrGuestStopped) {
		t.Fatalf("after a kill between the destroy and the disks: %v, want ErrGuestStopped", err)
	}
	if st := state(); st != xenlight.Shutoff {
		t.Fatalf("the reported guest is %s, want shut off", st)
	}
	if _, err := d.DiskList(ctx, g.name); err != nil {
		t.Fatalf("the report is given once: %v", err)
	}
	for _, disk := range disks {
		run(t, "qemu-img", "check", "-q", g.diskList(d)[disk].Source)
	}
}

//go:build xen && libxl

package xen

import (
	"context"
	"errors"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// TestRescanHook: a running guest's chain edited from outside xlsnap,
// straight on libxl's QMP socket, then ChainChanged. A change the device
// model made itself (block-stream) is taken in and both views agree; an
// overlay xlsnap never heard of is reported as a *MismatchError.
func TestRescanHook(t *testing.T) {
	ctx := context.Background()
	g := newGuest(t, "g4")
	g.start(nil)
	h := newLibxl(t)
	d := g.openDriver(h)
	overlay := filepath.Join(g.dir, "xvda.r1.qcow2")
	req := driver.SnapshotRequest{Name: "r1", Disks: []driver.DiskRequest{
		{Name: "xvda", External: true, ExternalFormat: "qcow2", ExternalPath: overlay},
		{Name: "xvdb", Skip: true},
	}}
	if _, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	outside := func(fn func(m *qmp.Monitor, node string) error) {
		t.Helper()
		m, err := h.DeviceModel(ctx, g.name)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Disconnect()
		chains, err := xenlight.Chains(ctx, m)
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(chains, func(c xenlight.DiskChain) bool { return slices.Contains(c.Files, overlay) })
		if i < 0 {
			t.Fatalf("no device model disk over %s: %+v", overlay, chains)
		}
		if err := fn(m, chains[i].Node); err != nil {
			t.Fatal(err)
		}
	}
	// Outside: pull the base into the overlay; QEMU drops the backing.
	outside(func(m *qmp.Monitor, node string) error {
		return m.RunJob(ctx, qmp.Job{ID: "outside"}, "block-stream", map[string]any{"job-id": "outside", "device": node})
	})
	t.Logf("before the rescan xlsnap's record of xvda: %v", g.diskList(d)["xvda"].Chain)
	t0 := time.Now()
	if err := d.ChainChanged(ctx, g.name, "xvda"); err != nil {
		t.Fatalf("ChainChanged after a change the device model made: %v", err)
	}
	timing(t, "case 7: rescan, views agree", t0)
	if c := g.diskList(d)["xvda"].Chain; !slices.Equal(c, []string{overlay}) {
		t.Fatalf("after the rescan xlsnap's record of xvda is %v, want [%s]", c, overlay)
	}
	g.expectChain(g.chains(h), overlay)

	// Outside: an overlay xlsnap does not know.
	ext := filepath.Join(g.dir, "xvda.outside.qcow2")
	outside(func(m *qmp.Monitor, node string) error {
		return m.Execute(ctx, "blockdev-snapshot-sync", map[string]any{"node-name": node, "snapshot-file": ext,
			"snapshot-node-name": "outside", "format": "qcow2"}, nil)
	})
	t0 = time.Now()
	err := d.ChainChanged(ctx, g.name, "xvda")
	timing(t, "case 7: rescan, views differ", t0)
	var me *xenlight.MismatchError
	if !errors.Is(err, xenlight.ErrChainMismatch) || !errors.As(err, &me) {
		t.Fatalf("ChainChanged with an unknown overlay on top: %v, want a *MismatchError", err)
	}
	t.Logf("typed error: %v (device model %v, on disk %v)", err, me.DeviceModel, me.OnDisk)
	if !slices.Equal(me.DeviceModel, []string{ext, overlay}) || !slices.Equal(me.OnDisk, []string{overlay}) {
		t.Fatalf("mismatch %+v, want device model [%s %s], on disk [%s]", me, ext, overlay, overlay)
	}
	last := g.waitSeq(ext, "xvda", 3)
	g.stop()
	expectRecords(t, ext, "xvda", last)
	expectRecords(t, g.base["xvdb"], "xvdb", last)
}

// TestMoveBackingLiveXen (case 12): the storage admin's move, through
// libxl's QMP socket: a running guest's base images are copied to
// another folder, the rescan hook is told of each move, the device model
// switches to the copies (blockdev-reopen under xen-block), the old
// files are removed at once, the guest writes on, and after it stops the
// overlays' headers name the copies and every record reads back.
func TestMoveBackingLiveXen(t *testing.T) {
	ctx := context.Background()
	g := newGuest(t, "g9")
	g.start(nil)
	h := newLibxl(t)
	d := g.openDriver(h)
	req, overlays := g.externalRequest("mv1")
	if _, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	frozen := map[string]int{}
	for _, disk := range disks {
		frozen[disk], _ = records(t, g.base[disk], disk, true)
		g.waitSeq(overlays[disk], disk, frozen[disk]+2)
	}
	moved := filepath.Join(g.dir, "moved")
	run(t, "mkdir", "-p", moved)
	newBase := map[string]string{}
	for _, disk := range disks {
		newBase[disk] = filepath.Join(moved, filepath.Base(g.base[disk]))
		run(t, "cp", "--sparse=always", g.base[disk], newBase[disk])
		t0 := time.Now()
		if err := d.ChainChanged(ctx, g.name, disk, driver.Move{From: g.base[disk], To: newBase[disk]}); err != nil {
			t.Fatalf("rescan of %s with its base moved: %v\n%s", disk, err, g.console())
		}
		timing(t, "case 12: rescan with a move, "+disk, t0)
	}
	chains := g.chains(h)
	for _, disk := range disks {
		g.expectChain(chains, overlays[disk], newBase[disk])
		run(t, "rm", g.base[disk])
	}
	last := 0
	for _, disk := range disks {
		last, _ = records(t, overlays[disk], disk, true)
		last = g.waitSeq(overlays[disk], disk, last+3)
	}
	g.stop()
	for _, disk := range disks {
		out := run(t, "qemu-img", "info", "-f", "qcow2", overlays[disk])
		if !strings.Contains(out, "backing file: "+newBase[disk]+"\n") {
			t.Fatalf("%s after the move:\n%s", overlays[disk], out)
		}
		expectRecords(t, overlays[disk], disk, last)
		run(t, "qemu-img", "check", "-q", "-f", "qcow2", newBase[disk])
	}
	// The snapshot reads its data from the copies.
	if err := d.RevertToSnapshot(ctx, g.name, "mv1", 0); err != nil {
		t.Fatal(err)
	}
	for disk, di := range g.diskList(d) {
		if len(di.Chain) != 2 || di.Chain[1] != newBase[disk] {
			t.Fatalf("%s after the revert reads %v, want a new layer on %s", disk, di.Chain, newBase[disk])
		}
		if got := expectRecords(t, di.Source, disk, frozen[disk]); got > frozen[disk]+1 {
			t.Fatalf("%s: the reverted disk reads record %d, the snapshot was at %d", disk, got, frozen[disk])
		}
	}
}

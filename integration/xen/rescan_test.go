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

// TestRescanHook: a running guest's base moved to other storage (case
// 12), then its chain edited from outside xlsnap,
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
	// Case 12, the storage admin's move: the running guest's base is
	// copied to another folder and the hook told; the device model
	// switches to the copy (blockdev-reopen under xen-block), the old
	// file goes at once, and the guest writes on through the copy, whose
	// name the overlay's header now holds.
	moved := filepath.Join(g.dir, "moved")
	run(t, "mkdir", "-p", moved)
	newBase := filepath.Join(moved, filepath.Base(g.base["xvda"]))
	// The first phase: the move is announced, checked against the
	// running guest, and the domain held until the rescan; a merge of
	// what the guest reads is refused (55), pointing at blockcommit.
	_, err := d.ChainChanging(ctx, g.name, "xvda", driver.ChainEdit{Commits: []string{overlay}}, time.Minute)
	if driver.Code(err) != driver.ErrNumOperationInvalid || !strings.Contains(err.Error(), "blockcommit") {
		t.Fatalf("announcing a commit of the running guest's chain: %v", err)
	}
	hold, err := d.ChainChanging(ctx, g.name, "xvda", driver.ChainEdit{Moves: []driver.Move{{From: g.base["xvda"], To: newBase}}}, time.Minute)
	if err != nil {
		t.Fatalf("announcing the move: %v", err)
	}
	t.Logf("held: %s", strings.Join(hold.Checked, "; "))
	run(t, "cp", "--sparse=always", g.base["xvda"], newBase)
	t0 := time.Now()
	if err := d.ChainChanged(ctx, g.name, "xvda", driver.Move{From: g.base["xvda"], To: newBase}); err != nil {
		t.Fatalf("rescan with the base moved: %v\n%s", err, g.console())
	}
	timing(t, "case 12: rescan with a move", t0)
	key, err := d.DomainKey(ctx, g.name)
	if err != nil {
		t.Fatal(err)
	}
	if held, _, err := d.Storage().HoldOf(ctx, key); err != nil || held != nil {
		t.Fatalf("the hold after the rescan: %+v %v", held, err)
	}
	g.expectChain(g.chains(h), overlay, newBase)
	run(t, "rm", g.base["xvda"])
	if out := run(t, "qemu-img", "info", "-U", "-f", "qcow2", overlay); !strings.Contains(out, "backing file: "+newBase+"\n") {
		t.Fatalf("%s after the move:\n%s", overlay, out)
	}
	last, _ := records(t, overlay, "xvda", true)
	g.waitSeq(overlay, "xvda", last+2)
	run(t, "qemu-img", "check", "-U", "-q", "-f", "qcow2", newBase)

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
	t0 = time.Now()
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
	err = d.ChainChanged(ctx, g.name, "xvda")
	timing(t, "case 7: rescan, views differ", t0)
	var me *xenlight.MismatchError
	if !errors.Is(err, xenlight.ErrChainMismatch) || !errors.As(err, &me) {
		t.Fatalf("ChainChanged with an unknown overlay on top: %v, want a *MismatchError", err)
	}
	t.Logf("typed error: %v (device model %v, on disk %v)", err, me.DeviceModel, me.OnDisk)
	if !slices.Equal(me.DeviceModel, []string{ext, overlay}) || !slices.Equal(me.OnDisk, []string{overlay}) {
		t.Fatalf("mismatch %+v, want device model [%s %s], on disk [%s]", me, ext, overlay, overlay)
	}
	last = g.waitSeq(ext, "xvda", 3)
	g.stop()
	expectRecords(t, ext, "xvda", last)
	expectRecords(t, g.base["xvdb"], "xvdb", last)
}

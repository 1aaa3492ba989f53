//go:build xen && libxl

package xen

import (
	"context"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
)

// TestBlockJobsXen (case 13): virsh's blockcommit and blockpull on a
// running PV guest through libxl's QMP (the device model's socket libxl
// keeps): two layers taken live with NO_METADATA on both disks, then an
// active commit of xvda's whole chain into its base with the pivot, and a
// whole pull of xvdb into its active layer, the guest writing
// throughout. Each disk's chain is then the same in the records, in the
// device model (query-block) and on disk; the layers xlsnap made that
// left a chain are gone, xvdb's base (the user's) stays; after the guest
// stops, every record it wrote is in the images and qemu-img check is
// clean.
func TestBlockJobsXen(t *testing.T) {
	ctx := context.Background()
	g := newGuest(t, "g8")
	g.start(nil)
	h := newLibxl(t)
	d := g.openDriver(h)
	layers := map[string]map[string]string{} // layer name, then disk: overlay
	for _, name := range []string{"a", "b"} {
		req, overlays := g.externalRequest(name)
		if _, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly|driver.CreateAtomic|driver.CreateNoMetadata); err != nil {
			t.Fatalf("live layer %s: %v\n%s", name, err, g.console())
		}
		layers[name] = overlays
		for _, disk := range disks {
			g.waitSeq(overlays[disk], disk, 1)
		}
	}
	chains := g.chains(h)
	for _, disk := range disks {
		g.expectChain(chains, layers["b"][disk], layers["a"][disk], g.base[disk])
	}
	before, _ := records(t, layers["b"]["xvda"], "xvda", true)

	t0 := time.Now()
	r, err := d.BlockCommit(ctx, g.name, "xvda", "", "", 0, driver.BlockCommitActive)
	if err != nil {
		t.Fatalf("blockcommit --pivot: %v\n%s", err, g.console())
	}
	timing(t, "case 13: blockcommit --pivot through an image between", t0)
	if r.Active != g.base["xvda"] || !slices.Equal(r.Removed, []string{layers["b"]["xvda"], layers["a"]["xvda"]}) {
		t.Fatalf("blockcommit report %+v", r)
	}
	t0 = time.Now()
	r, err = d.BlockPull(ctx, g.name, "xvdb", 0, 0)
	if err != nil {
		t.Fatalf("blockpull: %v\n%s", err, g.console())
	}
	timing(t, "case 13: blockpull of the whole chain", t0)
	if r.Active != layers["b"]["xvdb"] || !slices.Equal(r.Removed, []string{layers["a"]["xvdb"]}) || !slices.Equal(r.Kept, []string{g.base["xvdb"]}) {
		t.Fatalf("blockpull report %+v", r)
	}
	active := map[string]string{"xvda": g.base["xvda"], "xvdb": layers["b"]["xvdb"]}
	chains = g.chains(h)
	for _, disk := range disks {
		di := g.diskList(d)[disk]
		if di.Source != active[disk] || !slices.Equal(di.Chain, []string{active[disk]}) {
			t.Fatalf("%s after the jobs: %+v, want the one image %s", disk, di, active[disk])
		}
		g.expectChain(chains, active[disk])
	}
	for _, gone := range []string{layers["a"]["xvda"], layers["b"]["xvda"], layers["a"]["xvdb"]} {
		if _, err := os.Stat(gone); !os.IsNotExist(err) {
			t.Errorf("%s, which left its chain and nothing uses, is still there: %v", gone, err)
		}
	}
	// Case 14: coalesce through libxl's QMP. One more NO_METADATA layer
	// on each disk is what no snapshot needs: coalesce merges it into
	// the layer under it, inside the device model, and each disk is one
	// image again.
	req, overlays := g.externalRequest("c")
	if _, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly|driver.CreateAtomic|driver.CreateNoMetadata); err != nil {
		t.Fatalf("live layer c: %v\n%s", err, g.console())
	}
	for _, disk := range disks {
		g.waitSeq(overlays[disk], disk, before+2)
	}
	t0 = time.Now()
	cr, err := d.Coalesce(ctx, g.name, 0)
	if err != nil {
		t.Fatalf("coalesce: %v\n%s", err, g.console())
	}
	timing(t, "case 14: coalesce of a layer per disk", t0)
	if len(cr.Merges) != len(disks) {
		t.Fatalf("coalesce merged %+v, want one layer per disk", cr.Merges)
	}
	chains = g.chains(h)
	for _, disk := range disks {
		di := g.diskList(d)[disk]
		if len(di.Chain) != 1 {
			t.Fatalf("%s after the coalesce: %v, want one image", disk, di.Chain)
		}
		active[disk] = di.Source
		g.expectChain(chains, active[disk])
	}
	var after int
	for _, disk := range disks {
		after = g.waitSeq(active[disk], disk, before+3)
	}
	g.stop()
	for _, disk := range disks {
		expectRecords(t, active[disk], disk, after)
	}
	problems, err := d.Check(ctx, false)
	if err != nil || len(problems) != 0 {
		t.Fatalf("check: %+v %v", problems, err)
	}
}

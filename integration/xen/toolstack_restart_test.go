//go:build xen && libxl

package xen

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/xenlight/libxl"
)

// toolstackHelper is the test binary run as an xlsnap process of its own
// (XLSNAP_XEN_HELPER=1): it opens the driver on libxl over the folders
// given and deletes snapshot s1 of the domain, so that XLSNAP_CRASH_AT
// can kill it with SIGKILL half-way.
func toolstackHelper() int {
	ctx := context.Background()
	src, err := driver.NewDirSource(os.Getenv("XLSNAP_XEN_DEFS"))
	if err != nil {
		return 2
	}
	h, err := libxl.New()
	if err != nil {
		return 2
	}
	d, err := driver.Open(ctx, driver.Config{StateDir: os.Getenv("XLSNAP_XEN_STATE"), Source: src, Pools: []string{os.Getenv("XLSNAP_XEN_POOL")}, Hypervisor: h})
	if err != nil {
		return 3
	}
	defer d.Close()
	if _, err := d.SnapshotDelete(ctx, os.Getenv("XLSNAP_XEN_DOMAIN"), "s1", 0); err != nil {
		return 4
	}
	return 0
}

// TestToolstackRestartXen (case 16): the toolstack process (xlsnap on
// libxl, in xl's place) is SIGKILLed while its live merge runs as a block
// job in the device model: the job goes on without it. The next xlsnap
// process's first call adopts the job through libxl's QMP socket, finishes
// the delete from the journal, and the guest, which wrote throughout,
// reads back every record from the merged images.
func TestToolstackRestartXen(t *testing.T) {
	ctx := context.Background()
	g := newGuest(t, "g12")
	g.start(nil)
	h := newLibxl(t)
	d := g.openDriver(h)
	req, s1 := g.externalRequest("s1")
	if _, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly|driver.CreateAtomic); err != nil {
		t.Fatalf("live snapshot: %v\n%s", err, g.console())
	}
	for _, disk := range disks {
		last, _ := records(t, s1[disk], disk, true)
		g.waitSeq(s1[disk], disk, last+2)
	}
	d.Close()

	point := "delete/step0-live-commit/job-started"
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "XLSNAP_XEN_HELPER=1", "XLSNAP_XEN_DEFS="+g.defs, "XLSNAP_XEN_STATE="+filepath.Join(workDir, g.name, "state"),
		"XLSNAP_XEN_POOL="+g.dir, "XLSNAP_XEN_DOMAIN="+g.name, "XLSNAP_CRASH_AT="+point)
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("the toolstack process at %s: %v, want death by SIGKILL\n%s", point, err, out)
	}

	// The next process.
	d2 := g.openDriver(newLibxl(t))
	t0 := time.Now()
	// domblklist reads the domain: the device model's pending work is
	// judged first.
	if _, err := d2.DiskList(ctx, g.name); err != nil {
		t.Fatalf("the first call after the toolstack's death: %v\n%s", err, g.console())
	}
	timing(t, "case 16: recovery adopts the running merge", t0)
	list, err := d2.ListAllSnapshots(ctx, g.name, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 0 {
		t.Fatalf("snapshots after recovering the delete: %d, want none", len(list))
	}
	chains := g.chains(h)
	var after int
	for _, disk := range disks {
		g.expectChain(chains, g.base[disk])
		if c := g.diskList(d2)[disk].Chain; len(c) != 1 || c[0] != g.base[disk] {
			t.Fatalf("xlsnap's chain of %s after recovery: %v", disk, c)
		}
		last, _ := records(t, g.base[disk], disk, true)
		after = g.waitSeq(g.base[disk], disk, last+2)
	}
	g.stop()
	for _, disk := range disks {
		expectRecords(t, g.base[disk], disk, after)
		if _, err := os.Stat(s1[disk]); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("the merged overlay %s is still there: %v", s1[disk], err)
		}
	}
}

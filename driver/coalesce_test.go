package driver_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// twoDomains is a folder source (defs) with shut-off domains a and b,
// one disk each (pool/a.qcow2, pool/b.qcow2), in one pool, and a driver
// opened on it with cfg(pool).
func twoDomains(t *testing.T, cfg func(pool string) driver.Config) (d *driver.Driver, pool, defs string) {
	t.Helper()
	pool, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defs = t.TempDir()
	for _, n := range []string{"a", "b"} {
		img := filepath.Join(pool, n+".qcow2")
		if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", img, "1M").CombinedOutput(); err != nil {
			t.Fatalf("qemu-img create: %v\n%s", err, out)
		}
		doc := fmt.Sprintf(`<domain type='xen'><name>%s</name><memory>262144</memory><os><type>xen</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda'/></disk></devices></domain>`, n, img)
		if err := os.WriteFile(filepath.Join(defs, n+".xml"), []byte(doc), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	c := cfg(pool)
	c.StateDir, c.Source, c.Pools = t.TempDir(), dirSource(t, defs), []string{pool}
	if d, err = driver.Open(context.Background(), c); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, pool, defs
}

func dirSource(t *testing.T, dir string) *driver.DirSource {
	t.Helper()
	src, err := driver.NewDirSource(dir)
	if err != nil {
		t.Fatal(err)
	}
	return src
}

func noConfig(string) driver.Config { return driver.Config{} }

func chainOf(t *testing.T, d *driver.Driver, domain string) []string {
	t.Helper()
	disks, err := d.DiskList(context.Background(), domain)
	if err != nil || len(disks) != 1 {
		t.Fatalf("DiskList %s: %+v %v", domain, disks, err)
	}
	var out []string
	for _, p := range disks[0].Chain {
		out = append(out, filepath.Base(p))
	}
	return out
}

// TestCoalesceEveryDomain: with no domain named, Coalesce merges what
// every domain of the source left (NO_METADATA overlays here), and the
// definitions follow.
func TestCoalesceEveryDomain(t *testing.T) {
	ctx := context.Background()
	d, pool, _ := twoDomains(t, noConfig)
	for _, n := range []string{"a", "b"} {
		if _, err := d.SnapshotCreateXML(ctx, n, "<domainsnapshot><name>nm</name></domainsnapshot>", driver.CreateDiskOnly|driver.CreateNoMetadata); err != nil {
			t.Fatal(err)
		}
		if c := chainOf(t, d, n); len(c) != 2 {
			t.Fatalf("%s: chain %v", n, c)
		}
	}
	if _, err := d.Coalesce(ctx, "", 1<<5); !errors.Is(err, driver.ErrInvalidArg) {
		t.Fatalf("an unknown flag: %v", err)
	}
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events, err := d.Subscribe(sctx)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := d.Coalesce(ctx, "", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"a", "b"} {
		ev := <-events
		if ev.Domain != n || ev.Reason != driver.ReasonCoalesce || len(ev.Before) != 2 || len(ev.After) != 1 {
			t.Fatalf("event %+v, want %s's chain shortened by a coalesce", ev, n)
		}
	}
	if rep.DryRun || len(rep.Merges) != 2 || rep.Merges[0].Domain != "a" || rep.Merges[1].Domain != "b" {
		t.Fatalf("coalesce: %+v", rep)
	}
	for _, n := range []string{"a", "b"} {
		if c := chainOf(t, d, n); len(c) != 1 || c[0] != n+".qcow2" {
			t.Fatalf("%s after coalescing: %v", n, c)
		}
	}
	entries, err := os.ReadDir(pool)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 2 {
		t.Fatalf("pool after coalescing: %v", entries)
	}
}

// TestDepthLimitThroughTheDriver: Config.MaxDepth applies to every pool,
// PoolMaxDepth to one; the refusal is a ChainTooLongError carrying
// libvirt's VIR_ERR_OPERATION_INVALID; a limit for a folder that is no
// pool is refused at Open.
func TestDepthLimitThroughTheDriver(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		cfg  func(pool string) driver.Config
	}{
		{"every-pool", func(string) driver.Config { return driver.Config{MaxDepth: 2} }},
		{"one-pool", func(pool string) driver.Config {
			return driver.Config{MaxDepth: 9, PoolMaxDepth: map[string]int{pool: 2}}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d, _, _ := twoDomains(t, tc.cfg)
			if _, err := d.SnapshotCreateXML(ctx, "a", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
				t.Fatal(err)
			}
			_, err := d.SnapshotCreateXML(ctx, "a", "<domainsnapshot><name>s2</name></domainsnapshot>", driver.CreateDiskOnly)
			var tooLong *driver.ChainTooLongError
			if !errors.As(err, &tooLong) || driver.Code(err) != driver.ErrNumOperationInvalid || tooLong.Max != 2 ||
				len(tooLong.Held) != 2 || tooLong.Held[1].Snapshots[0] != "s1" {
				t.Fatalf("a third layer: %v (%+v)", err, tooLong)
			}
			if c := chainOf(t, d, "a"); len(c) != 2 {
				t.Fatalf("chain after the refusal: %v", c)
			}
		})
	}
	_, pool, defs := twoDomains(t, noConfig)
	_, err := driver.Open(ctx, driver.Config{StateDir: t.TempDir(), Source: dirSource(t, defs), Pools: []string{pool},
		PoolMaxDepth: map[string]int{pool + "/other": 3}})
	if !errors.Is(err, driver.ErrInvalidArg) || !strings.Contains(err.Error(), "none of the pools") {
		t.Fatalf("a limit for no pool: %v", err)
	}
	_, err = driver.Open(ctx, driver.Config{StateDir: t.TempDir(), Source: dirSource(t, defs), Pools: []string{pool}, MaxDepth: -1})
	if !errors.Is(err, driver.ErrInvalidArg) {
		t.Fatalf("a negative limit: %v", err)
	}
}

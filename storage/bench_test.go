package storage_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// Benchmarks of storage operations against the bare qemu-img command each
// wraps, run in the same process on the same kind of images. Sub-
// benchmarks NAME/native (xlsnap) and NAME/qemu-img (the baseline) are
// paired by scripts/benchtable.sh, which prints baseline ÷ native: here
// below 1, since xlsnap does the qemu-img work plus its journal and
// metadata. The goals: snapshot create within 1.2× and merge within 1.1×
// of qemu-img, a listing of 10,000 snapshots under 50 ms.

// benchXML is a domain definition of about 1 KiB, the size a snapshot
// record carries.
var benchXML = "<domain type='xen'><name>vm</name>" + strings.Repeat("<!-- padding to a realistic size -->", 27) + "</domain>"

func benchTool(b *testing.B, name string) string {
	b.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		b.Skipf("%s not installed", name)
	}
	return p
}

// benchManager opens a Manager on a fresh pool and state folder and
// returns it with the pool's path.
func benchManager(b *testing.B) (*storage.Manager, string) {
	b.Helper()
	storage.Register("dir", dir.New)
	pool, err := filepath.EvalSymlinks(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	m, err := storage.Open(context.Background(), storage.Config{StateDir: b.TempDir(),
		Pools: []storage.PoolConfig{{Name: "default", Type: "dir", Path: pool}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	return m, pool
}

// BenchmarkSnapshotCreate: one external disk-only snapshot of a 1-disk
// domain (journal, overlay, metadata) against `qemu-img create -f qcow2
// -F qcow2 -b BASE OVERLAY`. Both grow a chain and start a new one every
// chainLen snapshots, outside the timer.
func BenchmarkSnapshotCreate(b *testing.B) {
	qemuImg := benchTool(b, "qemu-img")
	const chainLen = 32
	b.Run("native", func(b *testing.B) {
		m, pool := benchManager(b)
		ctx := context.Background()
		var domain string
		for i := 0; i < b.N; i++ {
			if i%chainLen == 0 {
				b.StopTimer()
				domain = fmt.Sprintf("vm%d", i/chainLen)
				base := filepath.Join(pool, domain+".qcow2")
				storagetest.Run(b, qemuImg, "create", "-q", "-f", "qcow2", base, "1G")
				if _, err := m.DefineDomain(ctx, domain, domain, "", []storage.DiskSpec{{Target: "vda", Path: base, Format: "qcow2"}}); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			_, err := m.CreateSnapshot(ctx, domain, storage.SnapshotSpec{Name: fmt.Sprintf("s%d", i), DomainXML: benchXML,
				Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}})
			if err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		if d, err := m.Domain(ctx, domain); err != nil || d.Disk("vda").Active != filepath.Join(pool, fmt.Sprintf("%s.s%d", domain, b.N-1)) {
			b.Fatalf("the last snapshot is not the active layer: %+v, %v", d, err)
		}
	})
	b.Run("qemu-img", func(b *testing.B) {
		dir := b.TempDir()
		var top string
		for i := 0; i < b.N; i++ {
			if i%chainLen == 0 {
				b.StopTimer()
				top = filepath.Join(dir, fmt.Sprintf("vm%d.qcow2", i/chainLen))
				storagetest.Run(b, qemuImg, "create", "-q", "-f", "qcow2", top, "1G")
				b.StartTimer()
			}
			overlay := filepath.Join(dir, fmt.Sprintf("vm%d.s%d", i/chainLen, i))
			storagetest.Run(b, qemuImg, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", top, overlay)
			top = overlay
		}
	})
}

// BenchmarkMerge: deleting an external snapshot whose child holds 16 MiB
// (its state image 32 MiB, so the child is committed down) against
// `qemu-img commit` of the same child. Each iteration starts, outside the
// timer, from a copy of the same base image.
func BenchmarkMerge(b *testing.B) {
	qemuImg := benchTool(b, "qemu-img")
	qemuIO := benchTool(b, "qemu-io")
	template := filepath.Join(b.TempDir(), "template.qcow2")
	storagetest.Run(b, qemuImg, "create", "-q", "-f", "qcow2", template, "64M")
	storagetest.Run(b, qemuIO, "-f", "qcow2", "-c", "write -P 0x31 0 32M", template)
	writeChild := func(path string) {
		storagetest.Run(b, qemuIO, "-f", "qcow2", "-c", "write -P 0x32 32M 16M", path)
	}
	b.Run("native", func(b *testing.B) {
		m, pool := benchManager(b)
		ctx := context.Background()
		base, child := filepath.Join(pool, "vm.qcow2"), filepath.Join(pool, "vm.s1")
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			storagetest.CopyFile(b, template, base)
			if _, err := m.DefineDomain(ctx, "vm", "vm", "", []storage.DiskSpec{{Target: "vda", Path: base, Format: "qcow2"}}); err != nil {
				b.Fatal(err)
			}
			if _, err := m.CreateSnapshot(ctx, "vm", storage.SnapshotSpec{Name: "s1", DomainXML: benchXML,
				Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
				b.Fatal(err)
			}
			writeChild(child)
			b.StartTimer()
			r, err := m.DeleteSnapshot(ctx, "vm", "s1", storage.DeleteOptions{})
			b.StopTimer()
			if err != nil {
				b.Fatal(err)
			}
			if r.Disks[0].Action != storage.ActionMergedDown {
				b.Fatalf("merge %+v, want a commit down", r.Disks)
			}
			if i == 0 {
				storagetest.Run(b, qemuIO, "-r", "-f", "qcow2", "-c", "read -P 0x31 0 32M", "-c", "read -P 0x32 32M 16M", base)
			}
			if err := os.Remove(base); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	})
	b.Run("qemu-img", func(b *testing.B) {
		dir := b.TempDir()
		base, child := filepath.Join(dir, "vm.qcow2"), filepath.Join(dir, "vm.s1")
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			storagetest.CopyFile(b, template, base)
			storagetest.Run(b, qemuImg, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, child)
			writeChild(child)
			b.StartTimer()
			storagetest.Run(b, qemuImg, "commit", "-q", "-f", "qcow2", child)
			b.StopTimer()
			for _, p := range []string{base, child} {
				if err := os.Remove(p); err != nil {
					b.Fatal(err)
				}
			}
			b.StartTimer()
		}
	})
}

// BenchmarkList10000: Manager.Snapshots of a domain with 10,000 snapshot
// records (a chain of them, each with two disks and 1 KiB of domain XML
// kept apart from the listing), written straight into the store.
func BenchmarkList10000(b *testing.B) {
	const n = 10000
	ctx := context.Background()
	storage.Register("dir", dir.New)
	pool, state := b.TempDir(), b.TempDir()
	store, err := metastore.OpenBolt(ctx, filepath.Join(state, "xlsnap.db"))
	if err != nil {
		b.Fatal(err)
	}
	active := filepath.Join(pool, "vm-vda.qcow2")
	err = store.Update(ctx, func(tx metastore.Tx) error {
		d := &metastore.Domain{Name: "vm", UUID: "3f0e0f0c-6a57-4bd0-9b43-4f5b3e2a1c11", Current: fmt.Sprintf("snap-%05d", n-1),
			Disks:  []metastore.Disk{{Target: "vda", Active: active, Format: "qcow2"}, {Target: "vdb", Active: filepath.Join(pool, "vm-vdb.qcow2"), Format: "qcow2"}},
			Images: map[string]*metastore.Image{active: {Format: "qcow2"}, filepath.Join(pool, "vm-vdb.qcow2"): {Format: "qcow2"}}}
		if err := tx.PutDomain(d); err != nil {
			return err
		}
		created := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
		for i := range n {
			s := &metastore.Snapshot{Name: fmt.Sprintf("snap-%05d", i), Description: "nightly snapshot before the backup run",
				Created: created.Add(time.Duration(i) * time.Hour), State: "shutoff", DomainXML: benchXML,
				Disks: []metastore.SnapshotDisk{
					{Target: "vda", Mode: metastore.DiskExternal, Image: filepath.Join(pool, fmt.Sprintf("vm-vda.snap-%05d", i-1)), Format: "qcow2", Overlay: filepath.Join(pool, fmt.Sprintf("vm-vda.snap-%05d", i))},
					{Target: "vdb", Mode: metastore.DiskInternal, Image: filepath.Join(pool, "vm-vdb.qcow2"), Format: "qcow2"},
				}}
			if i > 0 {
				s.Parent = fmt.Sprintf("snap-%05d", i-1)
			}
			if err := tx.PutSnapshot("vm", s); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	m, err := storage.Open(ctx, storage.Config{StateDir: state, Pools: []storage.PoolConfig{{Name: "default", Type: "dir", Path: pool}}})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	b.ReportAllocs()
	for b.Loop() {
		list, err := m.Snapshots(ctx, "vm")
		if err != nil || len(list) != n {
			b.Fatalf("listed %d snapshots: %v", len(list), err)
		}
	}
}

// BenchmarkUsers1000: Manager.Users of a template base with 999 linked
// clones in the pool (a scan of every pool file, headers cached by stat
// after the first) against the least any scan costs: a walk of the pool
// that stats every file.
func BenchmarkUsers1000(b *testing.B) {
	const n = 1000
	ctx := context.Background()
	m, pool := benchManager(b)
	qemuImg := benchTool(b, "qemu-img")
	base := filepath.Join(pool, "template.qcow2")
	clone := filepath.Join(pool, "clone-0000.qcow2")
	for _, args := range [][]string{{"create", "-q", "-f", "qcow2", base, "1G"},
		{"create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, clone}} {
		if out, err := exec.Command(qemuImg, args...).CombinedOutput(); err != nil {
			b.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
	}
	for i := 1; i < n-1; i++ {
		storagetest.CopyFile(b, clone, filepath.Join(pool, fmt.Sprintf("clone-%04d.qcow2", i)))
	}
	b.Run("native", func(b *testing.B) {
		for b.Loop() {
			us, err := m.Users(ctx, base)
			if err != nil || len(us) != n-1 {
				b.Fatalf("%d users: %v", len(us), err)
			}
		}
	})
	b.Run("stat-walk", func(b *testing.B) {
		for b.Loop() {
			k := 0
			err := filepath.WalkDir(pool, func(p string, e os.DirEntry, err error) error {
				if err == nil && !e.IsDir() {
					if _, err := os.Stat(p); err == nil {
						k++
					}
				}
				return err
			})
			if err != nil || k != n {
				b.Fatalf("walked %d: %v", k, err)
			}
		}
	})
}

package storage_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore"
	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore/etcdtest"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// The cluster store against the embedded one, in the same run: each
// NAME/native runs on a real three-member etcd on loopback, NAME/bbolt
// on the state folder's file; scripts/benchtable.sh prints bbolt ÷ etcd
// (the goal for snapshot create and delete: at least 0.77, etcd within
// 1.3× of bbolt).

// benchClusterManager opens a Manager on a fresh pool with the store
// kind names (native: etcd).
func benchClusterManager(b *testing.B, c *etcdtest.Cluster, kind string) (*storage.Manager, string) {
	b.Helper()
	if kind == "bbolt" {
		return benchManager(b)
	}
	storage.Register("dir", dir.New)
	pool, err := filepath.EvalSymlinks(b.TempDir())
	if err != nil {
		b.Fatal(err)
	}
	st, err := etcdstore.Open(context.Background(), etcdstore.Config{Endpoints: c.Endpoints, Prefix: newPrefix(), Host: "bench"})
	if err != nil {
		b.Fatal(err)
	}
	m, err := storage.Open(context.Background(), storage.Config{StateDir: b.TempDir(), Store: st, Host: "bench",
		Pools: []storage.PoolConfig{{Name: "default", Type: "dir", Path: pool}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { m.Close() })
	return m, pool
}

// BenchmarkClusterSnapshotCreate: BenchmarkSnapshotCreate's snapshot
// (journal, overlay, metadata) with each store.
func BenchmarkClusterSnapshotCreate(b *testing.B) {
	c := etcdtest.Start(b, 3)
	qemuImg := benchTool(b, "qemu-img")
	for _, kind := range []string{"native", "bbolt"} {
		b.Run(kind, func(b *testing.B) {
			m, pool := benchClusterManager(b, c, kind)
			ctx := context.Background()
			var domain string
			for i := 0; i < b.N; i++ {
				if i%32 == 0 {
					b.StopTimer()
					domain = fmt.Sprintf("vm%d", i/32)
					base := filepath.Join(pool, domain+".qcow2")
					storagetest.Run(b, qemuImg, "create", "-q", "-f", "qcow2", base, "1G")
					if _, err := m.DefineDomain(ctx, domain, domain, "", []storage.DiskSpec{{Target: "vda", Path: base, Format: "qcow2"}}); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				if _, err := m.CreateSnapshot(ctx, domain, storage.SnapshotSpec{Name: fmt.Sprintf("s%d", i), DomainXML: benchXML,
					Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkClusterSnapshotDelete: deleting an external snapshot whose
// overlay holds 64 KiB (merged into its image: journal, qemu-img,
// metadata, cleanup), with each store; the snapshot is taken outside
// the timer.
func BenchmarkClusterSnapshotDelete(b *testing.B) {
	c := etcdtest.Start(b, 3)
	qemuImg := benchTool(b, "qemu-img")
	qemuIO := benchTool(b, "qemu-io")
	for _, kind := range []string{"native", "bbolt"} {
		b.Run(kind, func(b *testing.B) {
			m, pool := benchClusterManager(b, c, kind)
			ctx := context.Background()
			base := filepath.Join(pool, "vm.qcow2")
			storagetest.Run(b, qemuImg, "create", "-q", "-f", "qcow2", base, "64M")
			if _, err := m.DefineDomain(ctx, "vm", "vm", "", []storage.DiskSpec{{Target: "vda", Path: base, Format: "qcow2"}}); err != nil {
				b.Fatal(err)
			}
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				name := fmt.Sprintf("s%d", i)
				if _, err := m.CreateSnapshot(ctx, "vm", storage.SnapshotSpec{Name: name, DomainXML: benchXML,
					Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
					b.Fatal(err)
				}
				storagetest.Run(b, qemuIO, "-f", "qcow2", "-c", "write -P 0x44 0 64k", filepath.Join(pool, "vm."+name))
				b.StartTimer()
				if _, err := m.DeleteSnapshot(ctx, "vm", name, storage.DeleteOptions{}); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkClusterLock: taking and releasing a domain's lock: a
// lease-backed etcd mutex on loopback, against the embedded store's lock
// file.
func BenchmarkClusterLock(b *testing.B) {
	c := etcdtest.Start(b, 3)
	ctx := context.Background()
	for _, kind := range []string{"native", "bbolt"} {
		b.Run(kind, func(b *testing.B) {
			var st metastore.Store
			var err error
			if kind == "bbolt" {
				st, err = metastore.OpenBolt(ctx, filepath.Join(b.TempDir(), "xlsnap.db"))
			} else {
				st, err = etcdstore.Open(ctx, etcdstore.Config{Endpoints: c.Endpoints, Prefix: newPrefix()})
			}
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			for b.Loop() {
				l, err := st.Lock(ctx, "vm", false)
				if err != nil {
					b.Fatal(err)
				}
				if err := l.Unlock(ctx); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkClusterList10000: snapshot-list's read of a domain with
// 10,000 snapshots (BenchmarkList10000's records) from etcd, against
// the same from bbolt. The goal: under 100 ms from etcd.
func BenchmarkClusterList10000(b *testing.B) {
	const n = 10000
	c := etcdtest.Start(b, 3)
	ctx := context.Background()
	for _, kind := range []string{"native", "bbolt"} {
		b.Run(kind, func(b *testing.B) {
			m, pool := benchClusterManager(b, c, kind)
			active := filepath.Join(pool, "vm-vda.qcow2")
			storagetest.Run(b, "qemu-img", "create", "-q", "-f", "qcow2", active, "16M")
			if _, err := m.DefineDomain(ctx, "vm", "vm", "", []storage.DiskSpec{{Target: "vda", Path: active, Format: "qcow2"}}); err != nil {
				b.Fatal(err)
			}
			store := m.Store()
			created := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
			// Written 500 a transaction: the whole list in one is past
			// etcd's request size limit.
			for from := 0; from < n; from += 500 {
				err := store.Update(ctx, func(tx metastore.Tx) error {
					for i := from; i < from+500; i++ {
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
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				list, err := m.Snapshots(ctx, "vm")
				if err != nil || len(list) != n {
					b.Fatalf("listed %d snapshots: %v", len(list), err)
				}
			}
		})
	}
}

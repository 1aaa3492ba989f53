package metastore_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// benchStore writes n snapshot records of one domain in one transaction,
// shaped like storage's BenchmarkList10000 (two disks, 1 KiB of XML).
func benchStore(b *testing.B, n int) *metastore.Bolt {
	b.Helper()
	ctx := context.Background()
	path := filepath.Join(b.TempDir(), "xlsnap.db")
	store, err := metastore.OpenBolt(ctx, path)
	if err != nil {
		b.Fatal(err)
	}
	xml := "<domain type='xen'><name>vm</name>" + strings.Repeat("<!-- padding to a realistic size -->", 27) + "</domain>"
	err = store.Update(ctx, func(tx metastore.Tx) error {
		if err := tx.PutDomain(&metastore.Domain{Name: "vm", Images: map[string]*metastore.Image{}}); err != nil {
			return err
		}
		for i := range n {
			s := &metastore.Snapshot{Name: fmt.Sprintf("snap-%05d", i), Description: "nightly snapshot before the backup run",
				Created: time.Date(2025, 1, 1, i%24, 0, 0, 0, time.UTC), State: "shutoff", DomainXML: xml,
				Disks: []metastore.SnapshotDisk{
					{Target: "vda", Mode: metastore.DiskExternal, Image: fmt.Sprintf("/pool/vm-vda.snap-%05d", i-1), Format: "qcow2", Overlay: fmt.Sprintf("/pool/vm-vda.snap-%05d", i)},
					{Target: "vdb", Mode: metastore.DiskInternal, Image: "/pool/vm-vdb.qcow2", Format: "qcow2"},
				}}
			if err := tx.PutSnapshot("vm", s); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if fi, err := os.Stat(path); err == nil {
			b.ReportMetric(float64(fi.Size())/(1<<20), "MiB")
		}
	})
	return store
}

// BenchmarkBackup: the copy storage takes after every committed
// operation (WriteTo, fsync, verify, rename, fsync of the folder).
func BenchmarkBackup(b *testing.B) {
	for _, n := range []int{10, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			store := benchStore(b, n)
			for b.Loop() {
				if err := store.Backup(context.Background()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkVerify: the check OpenBolt runs once per process (every
// record read, tx.Check).
func BenchmarkVerify(b *testing.B) {
	for _, n := range []int{10, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			store := benchStore(b, n)
			for b.Loop() {
				if err := store.Verify(context.Background()); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkUpdate: an empty write transaction, the floor every
// operation's commit pays, to set the backup against.
func BenchmarkUpdate(b *testing.B) {
	for _, n := range []int{10, 10000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			store := benchStore(b, n)
			for b.Loop() {
				if err := store.Update(context.Background(), func(metastore.Tx) error { return nil }); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// The store opened once per process (native) against the way it was
// before, each transaction opening and closing the file (reopen: bbolt's
// Open, its flock, mmap and free-list read, then Close), in the same run;
// scripts/benchtable.sh prints reopen ÷ native. One write is an intent
// put, one fsync.

// reopenUpdate is one write transaction the old way: the file opened for
// it alone. Goroutines of one process each take bbolt's flock on their
// own descriptor, so they wait for each other in bbolt's 50 ms retries.
func reopenUpdate(path string, key string) error {
	db, err := bolt.Open(path, 0o600, nil)
	if err != nil {
		return err
	}
	defer db.Close()
	return db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists([]byte("intents"))
		if err != nil {
			return err
		}
		return b.Put([]byte(key), []byte(`{"id":"`+key+`","domain":"vm","op":"snapshot"}`))
	})
}

// writes20 is the unit the issue measures: 20 small write transactions.
func writes20(b *testing.B, store metastore.Store, path string, who int) {
	ctx := context.Background()
	for i := range 20 {
		id := fmt.Sprintf("w%d-%02d", who, i)
		var err error
		if store == nil {
			err = reopenUpdate(path, id)
		} else {
			in := &metastore.Intent{ID: id, Domain: "vm", Op: "snapshot"}
			err = store.Update(ctx, func(tx metastore.Tx) error { return tx.PutIntent(in) })
		}
		if err != nil {
			b.Error(err)
			return
		}
	}
}

// BenchmarkWrites20: 20 write transactions in a row.
func BenchmarkWrites20(b *testing.B) {
	for _, kind := range []string{"native", "reopen"} {
		b.Run(kind, func(b *testing.B) {
			store, path := benchWriter(b, kind)
			for b.Loop() {
				writes20(b, store, path, 0)
			}
		})
	}
}

// BenchmarkWrites4x20: 4 goroutines writing 20 transactions each.
func BenchmarkWrites4x20(b *testing.B) {
	for _, kind := range []string{"native", "reopen"} {
		b.Run(kind, func(b *testing.B) {
			store, path := benchWriter(b, kind)
			for b.Loop() {
				var wg sync.WaitGroup
				for g := range 4 {
					wg.Go(func() { writes20(b, store, path, g) })
				}
				wg.Wait()
			}
		})
	}
}

// benchWriter is the shared store (native) or nil and the file's path
// (reopen), on a store of 10 snapshots.
func benchWriter(b *testing.B, kind string) (metastore.Store, string) {
	store := benchStore(b, 10)
	path := filepath.Join(b.TempDir(), "old.db")
	if kind == "native" {
		return store, path
	}
	store.Close()
	return nil, path
}

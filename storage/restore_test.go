package storage_test

import (
	"errors"
	"os"
	"reflect"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// TestRestoreStore: after a series of operations on real images, an
// empty or cut xlsnap.db makes Open fail with ErrDamaged (no panic, no
// empty store), and RestoreStore brings back the state after the last
// committed operation, keeping the damaged file.
func TestRestoreStore(t *testing.T) {
	e := concEnv(t)
	e.NewDomain("vm", "vda")
	for _, name := range []string{"s1", "s2", "s3"} {
		if _, err := e.M.CreateSnapshot(e.Ctx, "vm", storage.SnapshotSpec{Name: name, DomainXML: "<domain/>"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := e.M.DeleteSnapshot(e.Ctx, "vm", "s2", storage.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	want, err := e.M.Snapshots(e.Ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	e.M.Close()
	db := storage.StoreFile(e.StateDir)

	if _, err := storage.RestoreStore(e.Ctx, e.StateDir, false); !errors.Is(err, storage.ErrOperationInvalid) {
		t.Fatalf("restore of a clean store: %v", err)
	}
	good, err := os.ReadFile(db)
	if err != nil {
		t.Fatal(err)
	}
	for _, damage := range []struct {
		name string
		data []byte
	}{{"empty", nil}, {"cut", good[:len(good)/3]}} {
		t.Run(damage.name, func(t *testing.T) {
			if err := os.WriteFile(db, damage.data, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := storage.Open(e.Ctx, e.Config)
			if !errors.Is(err, storage.ErrDamaged) || !strings.Contains(err.Error(), db) {
				t.Fatalf("Open of a damaged store: %v", err)
			}
			r, err := storage.RestoreStore(e.Ctx, e.StateDir, false)
			if err != nil {
				t.Fatal(err)
			}
			if kept, err := os.ReadFile(r.SetAside); err != nil || len(kept) != len(damage.data) {
				t.Fatalf("damaged file not kept at %s: %v", r.SetAside, err)
			}
			m, err := storage.Open(e.Ctx, e.Config)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			got, err := m.Snapshots(e.Ctx, "vm")
			if err != nil || !reflect.DeepEqual(got, want) {
				t.Fatalf("after restore: %v %v, want %v", got, err, want)
			}
			if problems, err := m.Check(e.Ctx); err != nil || len(problems) != 0 {
				t.Fatalf("check after restore: %+v %v", problems, err)
			}
		})
	}
	if err := os.Remove(metastore.BackupPath(db)); err != nil {
		t.Fatal(err)
	}
	if _, err := storage.RestoreStore(e.Ctx, e.StateDir, true); err == nil || !strings.Contains(err.Error(), "no backup") {
		t.Fatalf("restore without a backup: %v", err)
	}
}

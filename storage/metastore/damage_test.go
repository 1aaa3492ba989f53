package metastore_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"

	"github.com/xlsnap/xlsnap/storage/metastore"
)

// fill writes n snapshot records over a few domains, one transaction
// each, as operations do.
func fill(t testing.TB, b *metastore.Bolt, n int) {
	t.Helper()
	ctx := context.Background()
	for i := range n {
		err := b.Update(ctx, func(tx metastore.Tx) error {
			dom := fmt.Sprintf("dom%d", i%4)
			if _, err := tx.Domain(dom); errors.Is(err, metastore.ErrNotFound) {
				if err := tx.PutDomain(&metastore.Domain{Name: dom, Images: map[string]*metastore.Image{}}); err != nil {
					return err
				}
			}
			return tx.PutSnapshot(dom, &metastore.Snapshot{Name: fmt.Sprintf("s%04d", i), State: "shutoff",
				DomainXML: strings.Repeat("<domain/>", 100)})
		})
		if err != nil {
			t.Fatal(err)
		}
	}
}

// dump reads every domain and snapshot, as a listing does.
func dump(b *metastore.Bolt) (map[string][]string, error) {
	out := map[string][]string{}
	err := b.View(context.Background(), func(tx metastore.Tx) error {
		names, err := tx.DomainNames()
		if err != nil {
			return err
		}
		for _, n := range names {
			if _, err := tx.Domain(n); err != nil {
				return err
			}
			snaps, err := tx.Snapshots(n)
			if err != nil {
				return err
			}
			for _, s := range snaps {
				out[n] = append(out[n], s.Name)
			}
		}
		return nil
	})
	return out, err
}

func newStore(t *testing.T, n int) (string, *metastore.Bolt) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "xlsnap.db")
	b, err := metastore.OpenBolt(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	fill(t, b, n)
	return path, b
}

// wantDamaged fails unless err wraps ErrDamaged, names the file and is
// one line.
func wantDamaged(t *testing.T, err error, path string) {
	t.Helper()
	if !errors.Is(err, metastore.ErrDamaged) || !strings.Contains(err.Error(), path) || strings.Contains(err.Error(), "\n") {
		t.Fatalf("got %v, want one line wrapping ErrDamaged naming %s", err, path)
	}
}

func TestDamagedEmptyFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "xlsnap.db")
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := metastore.OpenBolt(context.Background(), path)
	wantDamaged(t, err, path)
	// Not taken for a new store: the file stays as it was.
	if fi, err := os.Stat(path); err != nil || fi.Size() != 0 {
		t.Fatalf("the empty file was changed: %v %v", fi, err)
	}
}

func TestMissingFileIsNewStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "sub", "xlsnap.db")
	b, err := metastore.OpenBolt(context.Background(), path)
	if err != nil {
		t.Fatal(err)
	}
	if got, err := dump(b); err != nil || len(got) != 0 {
		t.Fatalf("new store: %v %v", got, err)
	}
	left, _ := filepath.Glob(path + ".new-*")
	if len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
}

// storeSize is the size the store's meta page counts (the file may be
// longer: bbolt grows it ahead) and its page size.
func storeSize(t *testing.T, path string) (need int64, pageSize int) {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	err = db.View(func(tx *bolt.Tx) error { need = tx.Size(); return nil })
	if err != nil {
		t.Fatal(err)
	}
	return need, db.Info().PageSize
}

func TestDamagedTruncated(t *testing.T) {
	path, _ := newStore(t, 200)
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	need, ps := storeSize(t, path)
	for _, cut := range []int64{1, 100, int64(ps) + 1, 2 * int64(ps), 3*int64(ps) + 17, need / 3, need / 2, need - int64(ps)} {
		t.Run(fmt.Sprint(cut), func(t *testing.T) {
			if err := os.WriteFile(path, good[:cut], 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := metastore.OpenBolt(context.Background(), path)
			wantDamaged(t, err, path)
			// A store already open (no verification) refuses too.
			b, other := openUnverified(t, path)
			_, err = dump(b)
			wantDamaged(t, err, other)
		})
	}
}

// openUnverified returns a Bolt on path without OpenBolt's verification,
// as a process that opened the store before it was damaged has it, and
// the name of its file.
func openUnverified(t *testing.T, path string) (*metastore.Bolt, string) {
	t.Helper()
	good := filepath.Join(t.TempDir(), "good.db")
	b, err := metastore.OpenBolt(context.Background(), good)
	if err != nil {
		t.Fatal(err)
	}
	// Swap the file under it: Bolt opens its file per transaction.
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(good, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return b, good
}

// livePages lists the pages a store uses (branch, leaf, freelist).
func livePages(t *testing.T, path string) []int {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true, PreLoadFreelist: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var ids []int
	err = db.View(func(tx *bolt.Tx) error {
		for id := 2; ; id++ {
			info, err := tx.Page(id)
			if err != nil || info == nil {
				return err
			}
			if info.Type != "free" {
				ids = append(ids, id)
			}
			id += info.OverflowCount
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

func TestDamagedGarbagePages(t *testing.T) {
	path, _ := newStore(t, 200)
	good, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	_, ps := storeSize(t, path)
	pages := livePages(t, path)
	if len(pages) < 10 {
		t.Fatalf("only %d live pages", len(pages))
	}
	rng := rand.New(rand.NewSource(10))
	for _, id := range pages {
		t.Run(fmt.Sprint("page", id), func(t *testing.T) {
			bad := append([]byte(nil), good...)
			rng.Read(bad[id*ps : (id+1)*ps])
			if err := os.WriteFile(path, bad, 0o600); err != nil {
				t.Fatal(err)
			}
			_, err := metastore.OpenBolt(context.Background(), path)
			wantDamaged(t, err, path)
			// Without the verification at open, reading every record
			// finds it or never reaches the page: no panic either way.
			b, other := openUnverified(t, path)
			if _, err := dump(b); err != nil {
				wantDamaged(t, err, other)
			}
		})
	}
	t.Run("both-meta-pages", func(t *testing.T) {
		bad := append([]byte(nil), good...)
		rng.Read(bad[:2*ps])
		if err := os.WriteFile(path, bad, 0o600); err != nil {
			t.Fatal(err)
		}
		_, err := metastore.OpenBolt(context.Background(), path)
		wantDamaged(t, err, path)
	})
}

func TestBugPanicIsNotDamage(t *testing.T) {
	_, b := newStore(t, 1)
	defer func() {
		if r := recover(); r == nil || fmt.Sprint(r) != "a bug" {
			t.Fatalf("recovered %v, want the panic to go on", r)
		}
	}()
	_ = b.View(context.Background(), func(metastore.Tx) error { panic("a bug") })
}

func TestBackupRestore(t *testing.T) {
	ctx := context.Background()
	path, b := newStore(t, 50)
	if _, err := metastore.RestoreBolt(ctx, path, false); err == nil || !strings.Contains(err.Error(), "no backup") {
		t.Fatalf("restore without a backup: %v", err)
	}
	if err := b.Backup(ctx); err != nil {
		t.Fatal(err)
	}
	want, err := dump(b)
	if err != nil {
		t.Fatal(err)
	}
	// A clean store is replaced only by force.
	if _, err := metastore.RestoreBolt(ctx, path, false); !errors.Is(err, metastore.ErrNotDamaged) {
		t.Fatalf("restore of a clean store: %v", err)
	}
	damagedBytes := []byte("not a database, but longer than nothing")
	if err := os.WriteFile(path, damagedBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := metastore.RestoreBolt(ctx, path, false)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(r.SetAside, path+".damaged-") || !strings.Contains(r.Reason, "damaged") {
		t.Fatalf("restored: %+v", r)
	}
	if kept, err := os.ReadFile(r.SetAside); err != nil || string(kept) != string(damagedBytes) {
		t.Fatalf("damaged file not kept: %q %v", kept, err)
	}
	if got, err := dump(b); err != nil || !reflect.DeepEqual(got, want) {
		t.Fatalf("after restore: %v %v", got, err)
	}
	// A second restore within the second keeps both damaged files.
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	r2, err := metastore.RestoreBolt(ctx, path, false)
	if err != nil || r2.SetAside == r.SetAside {
		t.Fatalf("second restore: %+v %v", r2, err)
	}
	// A damaged backup is refused and the store left alone.
	if err := os.WriteFile(metastore.BackupPath(path), []byte("garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := metastore.RestoreBolt(ctx, path, true); !errors.Is(err, metastore.ErrDamaged) || !strings.Contains(err.Error(), "backup") {
		t.Fatalf("restore from a damaged backup: %v", err)
	}
}

// TestBackupKeepsGoodCopy: a store damaged where only the check sees it
// does not replace the last good copy.
func TestBackupKeepsGoodCopy(t *testing.T) {
	ctx := context.Background()
	path, b := newStore(t, 200)
	if err := b.Backup(ctx); err != nil {
		t.Fatal(err)
	}
	before, err := os.ReadFile(metastore.BackupPath(path))
	if err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(path)
	_, ps := storeSize(t, path)
	pages := livePages(t, path)
	id := pages[len(pages)/2]
	rand.New(rand.NewSource(3)).Read(good[id*ps : (id+1)*ps])
	if err := os.WriteFile(path, good, 0o600); err != nil {
		t.Fatal(err)
	}
	wantDamaged(t, b.Backup(ctx), path)
	after, _ := os.ReadFile(metastore.BackupPath(path))
	if string(after) != string(before) {
		t.Fatal("a damaged store replaced the backup")
	}
	left, _ := filepath.Glob(path + ".backup.tmp-*")
	if len(left) != 0 {
		t.Fatalf("temporary files left: %v", left)
	}
}

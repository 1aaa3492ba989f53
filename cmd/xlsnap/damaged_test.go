package main

import (
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// usedSize is the size of the pages a bbolt file's meta page counts.
func usedSize(t *testing.T, path string) int {
	t.Helper()
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var size int64
	if err := db.View(func(tx *bolt.Tx) error { size = tx.Size(); return nil }); err != nil {
		t.Fatal(err)
	}
	if size <= 3*4096 {
		t.Fatalf("store of %d bytes: too small to cut inside its data pages", size)
	}
	return int(size)
}

// TestDamagedStore runs the real command on a damaged xlsnap.db: one
// line naming the file, exit 1, no stack trace; then check --restore
// brings back the listing after the last committed operation and keeps
// the damaged file.
func TestDamagedStore(t *testing.T) {
	c := newCLI(t)
	for _, name := range []string{"s1", "s2", "s3"} {
		c.ok("snapshot-create-as", "vm", name, "--disk-only")
	}
	c.ok("snapshot-delete", "vm", "s2")
	want := c.ok("snapshot-list", "vm")
	db := filepath.Join(c.state, "xlsnap.db")
	good, err := os.ReadFile(db)
	if err != nil {
		t.Fatal(err)
	}
	c.fails("not damaged", "check", "--restore")
	// Cut inside the pages the store uses: a cut in the unused tail that
	// bbolt grows the file by is no damage at all.
	used := usedSize(t, db)

	garbage := append([]byte(nil), good...)
	rand.New(rand.NewSource(7)).Read(garbage[2*4096:]) // every page past the meta pages
	for _, damage := range []struct {
		name string
		data []byte
	}{{"empty", nil}, {"cut", good[:used-4096]}, {"garbage", garbage}} {
		t.Run(damage.name, func(t *testing.T) {
			if err := os.WriteFile(db, damage.data, 0o600); err != nil {
				t.Fatal(err)
			}
			_, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "snapshot-list", "vm")
			if code == 0 || !strings.HasPrefix(stderr, "error: metadata store is damaged: "+db) ||
				strings.Count(strings.TrimSpace(stderr), "\n") != 0 || !strings.Contains(stderr, "check --restore") {
				t.Fatalf("exit %d, stderr %q", code, stderr)
			}
			out := c.ok("check", "--restore")
			if !strings.Contains(out, "Kept the replaced store as "+db+".damaged-") {
				t.Fatalf("check --restore said:\n%s", out)
			}
			if got := c.ok("snapshot-list", "vm"); got != want {
				t.Fatalf("after restore:\n%s\nwant:\n%s", got, want)
			}
			c.ok("check")
		})
	}
	kept, _ := filepath.Glob(db + ".damaged-*")
	if len(kept) != 3 {
		t.Fatalf("damaged files kept: %v", kept)
	}
	if err := os.Remove(db + ".backup"); err != nil {
		t.Fatal(err)
	}
	c.fails("no backup of the metadata store", "check", "--restore", "--force")
}

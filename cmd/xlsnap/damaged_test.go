package main

import (
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

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

	garbage := append([]byte(nil), good...)
	rand.New(rand.NewSource(7)).Read(garbage[2*4096:]) // every page past the meta pages
	for _, damage := range []struct {
		name string
		data []byte
	}{{"empty", nil}, {"cut", good[:len(good)/2]}, {"garbage", garbage}} {
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

package dir_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

func TestConformance(t *testing.T) {
	storage.Register("dir", dir.New)
	storagetest.Suite(t, "dir")
}

// TestNewImagesTakeOwner: an overlay takes the mode and owner of the image
// it covers, and an internal snapshot's copy those of the image it comes
// from (the device model may not run as root); the owner keeps write.
func TestNewImagesTakeOwner(t *testing.T) {
	ctx := context.Background()
	root := t.TempDir()
	b, err := dir.New(storage.PoolConfig{Name: "p", Type: "dir", Path: root})
	if err != nil {
		t.Fatal(err)
	}
	base := filepath.Join(root, "base.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", base, "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	uid, gid := os.Getuid(), os.Getgid()
	if uid == 0 {
		uid, gid = 65534, 65534 // nobody: only root can give files away
	}
	if err := os.Chown(base, uid, gid); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(base, 0o440); err != nil {
		t.Fatal(err)
	}
	expect := func(path string, mode os.FileMode) {
		t.Helper()
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != mode {
			t.Errorf("%s: mode %v, want %v", path, st.Mode().Perm(), mode)
		}
		sys := st.Sys().(*syscall.Stat_t)
		if int(sys.Uid) != uid || int(sys.Gid) != gid {
			t.Errorf("%s: owner %d:%d, want %d:%d", path, sys.Uid, sys.Gid, uid, gid)
		}
	}
	ov := filepath.Join(root, "ov.qcow2")
	if err := b.CreateOverlay(ctx, ov, "qcow2", base, "qcow2"); err != nil {
		t.Fatal(err)
	}
	expect(ov, 0o640)

	if err := os.Chmod(ov, 0o660); err != nil {
		t.Fatal(err)
	}
	is := b.(storage.InternalSnapshotter)
	if err := is.InternalCreate(ctx, ov, "qcow2", "s1"); err != nil {
		t.Fatal(err)
	}
	cp := filepath.Join(root, "copy.qcow2")
	if err := is.InternalCopy(ctx, ov, "qcow2", "s1", cp, base, "qcow2"); err != nil {
		t.Fatal(err)
	}
	expect(cp, 0o660)
}

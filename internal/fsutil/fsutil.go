// Package fsutil holds the durability steps every writer of xlsnap
// shares.
package fsutil

import (
	"os"
	"path/filepath"
	"syscall"
)

// SyncDir makes the names created, renamed or removed in dir durable:
// a file's own fsync does not cover its entry in the folder.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// WriteFile writes path whole or not at all: a temporary file in the same
// folder (".NAME.*"), given its mode and owner by prepare before any data
// is in it, fsync'ed, renamed over path, the folder fsync'ed.
func WriteFile(path string, data []byte, prepare func(*os.File) error) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if err := prepare(tmp); err != nil {
		tmp.Close()
		return err
	}
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	return SyncDir(filepath.Dir(path))
}

// SameOwner gives f the owner of like (a stat of another file) when they
// differ. Only root may give files away: for anyone else a refusal is no
// error, the file stays its creator's.
func SameOwner(f *os.File, like os.FileInfo) error {
	want, ok := like.Sys().(*syscall.Stat_t)
	if !ok {
		return nil
	}
	cur, err := f.Stat()
	if err != nil {
		return err
	}
	if have, ok := cur.Sys().(*syscall.Stat_t); ok && have.Uid == want.Uid && have.Gid == want.Gid {
		return nil
	}
	if err := f.Chown(int(want.Uid), int(want.Gid)); err != nil && os.Geteuid() == 0 {
		return err
	}
	return nil
}

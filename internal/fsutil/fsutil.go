// Package fsutil holds the one durability step every writer of xlsnap
// shares.
package fsutil

import "os"

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

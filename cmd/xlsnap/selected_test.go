package main

import "testing"

// TestNothingSelected: a snapshot that would capture no disk and no
// memory is refused as libvirt refuses it (qemuSnapshotPrepare,
// VIR_ERR_CONFIG_UNSUPPORTED), and leaves the folder and the list as they
// were.
func TestNothingSelected(t *testing.T) {
	c := newCLI(t)
	before := c.files()
	c.fails("error: unsupported configuration: disk-only snapshots require at least one disk to be selected for snapshot",
		"snapshot-create-as", "vm", "none1", "--disk-only", "--diskspec", "xvda,snapshot=no", "--diskspec", "xvdb,snapshot=no")
	c.fails("error: unsupported configuration: nothing selected for snapshot",
		"snapshot-create-as", "vm", "none2", "--diskspec", "xvda,snapshot=no", "--diskspec", "xvdb,snapshot=no")
	if got := c.files(); !slicesEqual(got, before) {
		t.Fatalf("folder changed: %v -> %v", before, got)
	}
	if out := c.ok("snapshot-list", "vm", "--name"); out != "\n" {
		t.Fatalf("snapshot-list: %q", out)
	}
	// One disk selected is a snapshot.
	c.ok("snapshot-create-as", "vm", "one", "--disk-only", "--diskspec", "xvda,snapshot=external", "--diskspec", "xvdb,snapshot=no")
}

package main

import "testing"

// TestSetCurrentAfterRevert: snapshot-current DOMAIN NAME (the
// snapshot's XML redefined with REDEFINE|CURRENT, as virsh does it)
// works for a snapshot whose images have left the disks' chains: an
// internal one a revert copied out, and an external one whose overlay a
// revert to another snapshot discarded. It used to fail with "invalid
// argument".
func TestSetCurrentAfterRevert(t *testing.T) {
	c := newCLI(t)
	c.ok("snapshot-create-as", "vm", "s1")
	c.ok("snapshot-create-as", "vm", "s2", "--disk-only")
	c.ok("snapshot-revert", "vm", "s1")
	for _, n := range []string{"s1", "s2", "s1"} {
		if out := c.ok("snapshot-current", "vm", n); out != "Snapshot "+n+" set as current\n" {
			t.Fatalf("snapshot-current vm %s: %q", n, out)
		}
		if out := c.ok("snapshot-current", "vm", "--name"); out != n+"\n" {
			t.Fatalf("current after snapshot-current vm %s: %q", n, out)
		}
	}
	c.ok("snapshot-revert", "vm", "s1")
	c.ok("snapshot-revert", "vm", "s2")
}

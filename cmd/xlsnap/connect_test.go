package main

import (
	"strings"
	"testing"
)

// TestConnectRelative: a folder URI must name an absolute path; a
// relative one would mean whatever folder the command runs in.
func TestConnectRelative(t *testing.T) {
	state := t.TempDir()
	for _, uri := range []string{"file://domains", "file:domains", "file://host/etc/xen"} {
		_, stderr, code := runXlsnap(t, "--connect", uri, "--state-dir", state, "snapshot-list", "vm")
		if code == 0 || !strings.Contains(stderr, "invalid argument") || !strings.Contains(stderr, "absolute path") {
			t.Errorf("--connect %s: exit %d, stderr %q; want an invalid argument naming the absolute path", uri, code, stderr)
		}
	}
}

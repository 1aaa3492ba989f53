package main

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// buildLean builds xlsnap into dir as make build does for bin/xlsnap:
// without cgo, so without libvirt.
func buildLean(tb testing.TB, dir string) string {
	tb.Helper()
	bin := filepath.Join(dir, "xlsnap")
	cmd := exec.Command("go", "build", "-o", bin, ".")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		tb.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestCompanion: the lean build links no libvirt, serves folder sources
// itself, names xlsnap-libvirt when a libvirt URI needs it and it is
// missing, and hands the command to it, output and exit code included,
// when it is there. The companion here is this test binary, a cgo build
// that runs main() under XLSNAP_RUN_MAIN.
func TestCompanion(t *testing.T) {
	dir := t.TempDir()
	bin := buildLean(t, dir)
	if out, err := exec.Command("ldd", bin).CombinedOutput(); err == nil && strings.Contains(string(out), "libvirt") {
		t.Fatalf("the lean build links libvirt:\n%s", out)
	}
	run := func(args ...string) (string, string, int) {
		t.Helper()
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1")
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		if ee, ok := err.(*exec.ExitError); ok {
			return stdout.String(), stderr.String(), ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		return stdout.String(), stderr.String(), 0
	}
	state := t.TempDir()
	companion := filepath.Join(dir, companionName)

	// A folder source needs no companion.
	if _, stderr, code := run("--connect", "file://"+t.TempDir(), "--state-dir", state, "snapshot-list", "vm"); code == 0 || strings.Contains(stderr, companionName) {
		t.Errorf("folder source: exit %d, stderr %q; want domain not found, without the companion", code, stderr)
	}
	_, stderr, code := run("--connect", "test:///default", "--state-dir", state, "snapshot-list", "test")
	if code == 0 || !strings.Contains(stderr, companion) || !strings.Contains(stderr, "unsupported") {
		t.Errorf("no companion: exit %d, stderr %q; want an unsupported configuration naming %s", code, stderr, companion)
	}

	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(self, companion); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := run("--connect", "test:///default", "--state-dir", state, "snapshot-list", "test")
	if code != 0 || !strings.Contains(stdout, "Creation Time") {
		t.Errorf("with the companion: exit %d, stdout %q, stderr %q; want the snapshot table", code, stdout, stderr)
	}
	if _, stderr, code := run("--connect", "test:///default", "--state-dir", state, "snapshot-info", "test", "nosuch"); code == 0 || !strings.Contains(stderr, "nosuch") {
		t.Errorf("the companion's failure: exit %d, stderr %q; want its error and a non-zero exit", code, stderr)
	}
}

package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
}

func TestChainJSON(t *testing.T) {
	dir := t.TempDir()
	qemuImg(t, "create", "-q", "-f", "raw", filepath.Join(dir, "base.raw"), "8M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "base.raw", filepath.Join(dir, "top.qcow2"))
	qemuImg(t, "snapshot", "-c", "before-upgrade", filepath.Join(dir, "top.qcow2"))

	stdout, stderr, code := runXlsnap(t, "chain", "--json", filepath.Join(dir, "top.qcow2"))
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var layers []struct {
		Path          string `json:"path"`
		Format        string `json:"format"`
		VirtualSize   uint64 `json:"virtual_size"`
		Backing       string `json:"backing"`
		BackingFormat string `json:"backing_format"`
		Snapshots     []struct {
			ID          string `json:"id"`
			Name        string `json:"name"`
			VMStateSize uint64 `json:"vm_state_size"`
			Date        string `json:"date"`
		} `json:"snapshots"`
	}
	if err := json.Unmarshal([]byte(stdout), &layers); err != nil {
		t.Fatalf("%v\n%s", err, stdout)
	}
	if len(layers) != 2 {
		t.Fatalf("%d layers: %s", len(layers), stdout)
	}
	top, base := layers[0], layers[1]
	if top.Path != filepath.Join(dir, "top.qcow2") || top.Format != "qcow2" || top.VirtualSize != 8<<20 ||
		top.Backing != "base.raw" || top.BackingFormat != "raw" {
		t.Errorf("top layer %+v", top)
	}
	if len(top.Snapshots) != 1 || top.Snapshots[0].Name != "before-upgrade" || top.Snapshots[0].ID != "1" || !rfc3339Re.MatchString(top.Snapshots[0].Date) {
		t.Errorf("top snapshots %+v", top.Snapshots)
	}
	if base.Path != filepath.Join(dir, "base.raw") || base.Format != "raw" || base.VirtualSize != 8<<20 || base.Backing != "" {
		t.Errorf("base layer %+v", base)
	}
}

// TestChainSnapshotBudget: the snapshot tables the command prints are read
// within --max-snapshot-bytes, and past it the refusal names the image.
func TestChainSnapshotBudget(t *testing.T) {
	top := filepath.Join(t.TempDir(), "top.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", top, "8M")
	qemuImg(t, "snapshot", "-c", "before-upgrade", top)

	stdout, stderr, code := runXlsnap(t, "chain", "--max-snapshot-bytes", "16", top)
	if code == 0 || stdout != "" || !strings.Contains(stderr, "too large") || !strings.Contains(stderr, top) {
		t.Fatalf("table past the budget: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	stdout, stderr, code = runXlsnap(t, "chain", top)
	if code != 0 || !strings.Contains(stdout, "before-upgrade") {
		t.Fatalf("default budget: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
}

func TestChainRefusedIsOneLineAndNonZero(t *testing.T) {
	root := t.TempDir()
	pool, elsewhere := filepath.Join(root, "pool"), filepath.Join(root, "elsewhere")
	for _, d := range []string{pool, elsewhere} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	qemuImg(t, "create", "-q", "-f", "qcow2", filepath.Join(elsewhere, "base.qcow2"), "8M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", "../elsewhere/base.qcow2", filepath.Join(pool, "top.qcow2"))

	stdout, stderr, code := runXlsnap(t, "chain", filepath.Join(pool, "top.qcow2"))
	if code == 0 || stdout != "" {
		t.Fatalf("refused chain: exit %d, stdout %q", code, stdout)
	}
	if strings.Count(strings.TrimSpace(stderr), "\n") != 0 || !strings.Contains(stderr, "outside the allowed roots") || !strings.Contains(stderr, "../elsewhere/base.qcow2") {
		t.Fatalf("stderr %q", stderr)
	}
	// With both folders as roots the same chain is sound.
	stdout, stderr, code = runXlsnap(t, "chain", "--root", pool, "--root", elsewhere, filepath.Join(pool, "top.qcow2"))
	if code != 0 || !strings.Contains(stdout, "../elsewhere/base.qcow2 (qcow2)") {
		t.Fatalf("exit %d\n%s%s", code, stdout, stderr)
	}
}

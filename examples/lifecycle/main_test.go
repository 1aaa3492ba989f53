package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// lifecycleDomain makes domain "web" on one qcow2 image holding 0x5e in
// its first MiB, in a folder of its own; it returns the folder and the
// image.
func lifecycleDomain(t *testing.T) (dir, img string) {
	t.Helper()
	dir = t.TempDir()
	img = filepath.Join(dir, "web-xvda.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5e 0 1M", img)
	def := fmt.Sprintf(`<domain type='xen'><name>web</name><memory>262144</memory><os><type>linux</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda'/></disk></devices></domain>`, img)
	if err := os.WriteFile(filepath.Join(dir, "web.xml"), []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	return dir, img
}

func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
	return string(out)
}

// expectOneLayer asserts the definition names img and img's chain, as
// qemu-img reads it, is img alone, holding 0x5e in its first MiB, sound.
func expectOneLayer(t *testing.T, dir, img string) {
	t.Helper()
	xml, err := os.ReadFile(filepath.Join(dir, "web.xml"))
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(xml), "file=\"")
	if active := strings.SplitN(string(xml)[i+6:], "\"", 2)[0]; active != img {
		t.Fatalf("the definition names %s, want the user's image %s", active, img)
	}
	var chain []struct {
		Filename string `json:"filename"`
	}
	out := sh(t, "qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", img)
	if err := json.Unmarshal([]byte(out), &chain); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, out)
	}
	if len(chain) != 1 || chain[0].Filename != img {
		t.Fatalf("chain %+v, want %s alone", chain, img)
	}
	if out := sh(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5e 0 1M", img); strings.Contains(out, "verification failed") {
		t.Fatalf("data lost: %s", out)
	}
	sh(t, "qemu-img", "check", "-q", "-f", "qcow2", img)
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var files []string
	for _, e := range entries {
		files = append(files, e.Name())
	}
	if strings.Join(files, " ") != "web-xvda.qcow2 web.xml" {
		t.Fatalf("the folder holds %v, want only the image and the definition", files)
	}
}

// TestExample runs the example three times on one domain and one state
// folder: after each run the disk is back on the user's image alone (no
// layer left behind, as each run once added one), with its data.
func TestExample(t *testing.T) {
	dir, img := lifecycleDomain(t)
	state := t.TempDir()
	for run := 1; run <= 3; run++ {
		if err := run1(dir, state); err != nil {
			t.Fatalf("run %d: %v", run, err)
		}
		expectOneLayer(t, dir, img)
	}
}

func run1(dir, state string) error { return run(context.Background(), dir, state, "web") }

// TestExampleAfterInterruptedRun: a run cut short left its snapshots;
// the next run deletes them and ends on one layer all the same.
func TestExampleAfterInterruptedRun(t *testing.T) {
	dir, img := lifecycleDomain(t)
	state := t.TempDir()
	ctx := context.Background()
	src, err := driver.NewDirSource(dir)
	if err != nil {
		t.Fatal(err)
	}
	d, err := driver.Open(ctx, driver.Config{StateDir: state, Source: src})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.CreateSnapshot(ctx, "web", driver.SnapshotRequest{Name: "before-upgrade"}, driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	if _, err := d.SnapshotCreateXML(ctx, "web", "<domainsnapshot><name>checkpoint</name></domainsnapshot>", 0); err != nil {
		t.Fatal(err)
	}
	d.Close()
	if err := run1(dir, state); err != nil {
		t.Fatal(err)
	}
	expectOneLayer(t, dir, img)
}

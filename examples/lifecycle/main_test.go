package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestExample runs the example on a real domain folder and reads the
// data back: after the revert and the merge, the disk shows what it held
// when "before-upgrade" was taken.
func TestExample(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "web-xvda.qcow2")
	sh := func(name string, args ...string) string {
		out, err := exec.Command(name, args...).CombinedOutput()
		if err != nil {
			t.Fatalf("%s %v: %v\n%s", name, args, err, out)
		}
		return string(out)
	}
	sh("qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	sh("qemu-io", "-f", "qcow2", "-c", "write -P 0x5e 0 1M", img)
	def := fmt.Sprintf(`<domain type='xen'><name>web</name><memory>262144</memory><os><type>linux</type></os>
<devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda'/></disk></devices></domain>`, img)
	if err := os.WriteFile(filepath.Join(dir, "web.xml"), []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := run(context.Background(), dir, t.TempDir(), "web"); err != nil {
		t.Fatal(err)
	}
	xml, err := os.ReadFile(filepath.Join(dir, "web.xml"))
	if err != nil {
		t.Fatal(err)
	}
	i := strings.Index(string(xml), "file=\"")
	active := strings.SplitN(string(xml)[i+6:], "\"", 2)[0]
	out := sh("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5e 0 1M", active)
	if strings.Contains(out, "verification failed") {
		t.Fatalf("data lost: %s", out)
	}
	sh("qemu-img", "check", "-q", "-f", "qcow2", active)
}

package driver_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// TestSnapshotXMLHidesPasswords: a snapshot's definition keeps the
// domain's graphics password, and dumpxml prints it only with XMLSecure,
// as libvirt prints it only with VIR_DOMAIN_SNAPSHOT_XML_SECURE.
func TestSnapshotXMLHidesPasswords(t *testing.T) {
	pool, defs := t.TempDir(), t.TempDir()
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(pool, "vda.qcow2"), "1M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	doc := `<domain type='xen'><name>vm</name><memory unit='KiB'>262144</memory><os><type>xen</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='` + filepath.Join(pool, "vda.qcow2") + `'/><target dev='vda' bus='xen'/></disk>
<graphics type='vnc' port='-1' autoport='yes' passwd='SEKRET123' passwdValidTo='2030-01-01T00:00:00'/>
</devices></domain>`
	if err := os.WriteFile(filepath.Join(defs, "vm.xml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := driver.NewDirSource(defs)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	d, err := driver.Open(ctx, driver.Config{StateDir: t.TempDir(), Source: src, Pools: []string{pool}})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := d.SnapshotCreateXML(ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", 0); err != nil {
		t.Fatal(err)
	}
	plain, err := d.SnapshotGetXMLDesc(ctx, "vm", "s1", 0)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(plain, "SEKRET123") || strings.Contains(plain, "passwdValidTo") || !strings.Contains(plain, "<graphics type='vnc' port='-1' autoport='yes'/>") {
		t.Fatalf("dumpxml without XMLSecure:\n%s", plain)
	}
	secure, err := d.SnapshotGetXMLDesc(ctx, "vm", "s1", driver.XMLSecure)
	if err != nil || !strings.Contains(secure, "passwd='SEKRET123'") {
		t.Fatalf("dumpxml with XMLSecure (%v):\n%s", err, secure)
	}
	// Making it current again from its secure XML keeps the password.
	if _, err := d.SnapshotCreateXML(ctx, "vm", secure, driver.CreateRedefine|driver.CreateCurrent); err != nil {
		t.Fatal(err)
	}
	if again, _ := d.SnapshotGetXMLDesc(ctx, "vm", "s1", driver.XMLSecure); again != secure {
		t.Fatalf("redefined from its own secure XML:\n%s\nwas:\n%s", again, secure)
	}
}

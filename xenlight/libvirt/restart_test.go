package libvirt_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/xenlight"
	xlvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

func TestRestartExplore(t *testing.T) {
	s := xlvirt.StartSession(t)
	ctx := context.Background()
	dir := s.Images()
	base := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "16M")
	qemuIO(t, base, "write -P 0x11 0 64k")
	if os.Getuid() == 0 {
		for _, p := range []string{dir, base} {
			if err := os.Lchown(p, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}
	}
	monitor := filepath.Join(dir, "r.qmp")
	admin, err := lv.NewConnect(s.URI())
	if err != nil {
		t.Fatal(err)
	}
	dom, err := admin.DomainDefineXML(xlvirt.QEMUDomainQMPXML("r", "3b0f7c52-9d1e-4a86-b2c4-7e5d1f0a9c83", base, monitor))
	if err != nil {
		t.Fatal(err)
	}
	if err := dom.Create(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dom.Destroy() })

	proxy := startRPCProxy(t, filepath.Join(filepath.Dir(filepath.Dir(dir)), "p.sock"), s.Socket())
	_ = proxy
	uri := "qemu+unix:///session?socket=" + filepath.Join(filepath.Dir(filepath.Dir(dir)), "p.sock")
	src, err := libvirtsource.Open(uri)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	h := xlvirt.New(src.Conn())
	d, err := driver.Open(ctx, driver.Config{StateDir: t.TempDir(), Source: src, Pools: []string{dir}, Hypervisor: h})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	proxy.Calls()
	if _, err := d.SnapshotCreateXML(ctx, "r", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	t.Logf("calls: %v", proxy.Calls())
	t.Logf("device model: %v", chainOf(t, monitor))
	fired := proxy.At(procDomainDefineXML, false, s.Kill)
	_, err = d.SnapshotCreateXML(ctx, "r", "<domainsnapshot><name>s2</name></domainsnapshot>", driver.CreateDiskOnly)
	<-fired
	t.Logf("s2: %v (code %d)", err, driver.Code(err))
	t.Logf("calls: %v", proxy.Calls())
	t.Logf("device model: %v", chainOf(t, monitor))
	_, err = d.SnapshotCreateXML(ctx, "r", "<domainsnapshot><name>s3</name></domainsnapshot>", driver.CreateDiskOnly)
	t.Logf("s3 while down: %v (code %d)", err, driver.Code(err))
	s.Start()
	l, err := d.DiskList(ctx, "r")
	t.Logf("after restart: %v %v", l, err)
}

func chainOf(t *testing.T, monitor string) []string {
	t.Helper()
	ctx := context.Background()
	m, err := qmp.Dial(ctx, "unix", monitor)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	chains, err := xenlight.Chains(ctx, m)
	if err != nil || len(chains) != 1 {
		t.Fatalf("query-block: %v %v", chains, err)
	}
	return chains[0].Files
}

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
}

func qemuIO(t *testing.T, img, cmd string) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, img).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-io %s %q: %v\n%s", img, cmd, err, out)
	}
}

//go:build xen && libxl

package xen

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/crashpoint"
	"github.com/xlsnap/xlsnap/xenlight"
	xlibvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
)

// killLibvirtd SIGKILLs libvirt's daemon and waits until it is gone; its
// socket and pid files stay behind, as after a crash.
func killLibvirtd(t *testing.T) {
	t.Helper()
	exec.Command("pkill", "-KILL", "-x", "libvirtd").Run()
	for i := 0; exec.Command("pgrep", "-x", "libvirtd").Run() == nil; i++ {
		if i == 100 {
			t.Fatal("libvirtd outlived SIGKILL for 10 s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// restartLibvirtd starts libvirt's daemon again after killLibvirtd.
func restartLibvirtd(t *testing.T) *lv.Connect {
	t.Helper()
	// What a crashed daemon leaves would make startLibvirtd believe it
	// runs.
	for _, f := range []string{"/run/libvirt/libvirt-sock", "/run/libvirt/libvirt-sock-ro", "/run/libvirt/libvirt-admin-sock", "/run/libvirtd.pid"} {
		os.Remove(f)
	}
	return startLibvirtd(t)
}

// libvirtDriver opens xlsnap's driver on xen:///system as a new xlsnap
// process would: its own connections.
func libvirtDriver(t *testing.T, g *guest, conn *lv.Connect) (*driver.Driver, xenlight.Hypervisor) {
	t.Helper()
	src, err := libvirtsource.Open(xenURI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	h := xlibvirt.New(conn)
	d, err := driver.Open(context.Background(), driver.Config{StateDir: filepath.Join(workDir, g.name, "state"), Source: src, Pools: []string{g.dir}, Hypervisor: h})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d, h
}

// TestLibvirtdRestartXen (case 15): libvirtd is killed in the middle of a
// live disk-only snapshot through xen:///system, after the device model
// switched to the overlays and before libvirt's definition names them.
// The call ends in a typed error; a call while libvirtd is down fails
// typed and changes nothing; the guest runs on under Xen, writing into
// the overlays; once libvirtd is back, the next xlsnap process's first
// call finishes the snapshot from the journal (libvirt's definition names
// the overlays), and every record written before and after reads back.
func TestLibvirtdRestartXen(t *testing.T) {
	ctx := context.Background()
	conn := startLibvirtd(t)
	g := newGuest(t, "g11")
	dom := g.defineLibvirt(conn)
	if err := dom.Create(); err != nil {
		t.Fatalf("starting %s through libvirt: %v\n%s", g.name, err, g.console())
	}
	g.waitConnected()
	for _, disk := range disks {
		g.waitSeq(g.base[disk], disk, 3)
	}
	d, _ := libvirtDriver(t, g, conn)

	req, s1 := g.externalRequest("s1")
	stop := crashpoint.Do("snapshot/definition", func() { killLibvirtd(t) })
	t0 := time.Now()
	_, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly|driver.CreateAtomic)
	stop()
	timing(t, "case 15: live snapshot, libvirtd killed before the definition", t0)
	if err == nil {
		t.Fatal("the snapshot succeeded with libvirtd killed before its definition step")
	}
	t.Logf("the call: %v (code %d)", err, driver.Code(err))
	if driver.Code(err) == errdefs.CodeInternal {
		t.Fatalf("untyped error: %v", err)
	}

	// libvirtd is down: a change fails typed, and quickly.
	t0 = time.Now()
	req2, _ := g.externalRequest("s2")
	if _, err := d.CreateSnapshot(ctx, g.name, req2, driver.CreateDiskOnly); err == nil || driver.Code(err) == errdefs.CodeInternal {
		t.Fatalf("a snapshot while libvirtd is down: %v (code %d), want a typed error", err, driver.Code(err))
	} else {
		t.Logf("while libvirtd is down: %v (code %d)", err, driver.Code(err))
	}
	timing(t, "case 15: a call while libvirtd is down", t0)
	for _, disk := range disks {
		if _, err := os.Stat(filepath.Join(g.dir, disk+".s2.qcow2")); !os.IsNotExist(err) {
			t.Fatalf("the refused snapshot left %s.s2.qcow2: %v", disk, err)
		}
	}

	// The device model switched before the kill: the guest writes on
	// into the overlays, whatever libvirt's state.
	frozen := map[string]int{}
	for _, disk := range disks {
		frozen[disk], _ = records(t, g.base[disk], disk, true)
		g.waitSeq(s1[disk], disk, frozen[disk]+2)
	}

	t0 = time.Now()
	conn2 := restartLibvirtd(t)
	timing(t, "case 15: libvirtd restart", t0)
	dom2, err := conn2.LookupDomainByName(g.name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dom2.Destroy(); dom2.Free() })
	if st, _, err := dom2.GetState(); err != nil || st != lv.DOMAIN_RUNNING {
		t.Fatalf("after libvirtd's restart the domain is %v (%v), want running", st, err)
	}
	d2, h2 := libvirtDriver(t, g, conn2)
	t0 = time.Now()
	// domblklist reads the domain: the journal's definition step is
	// finished first.
	if _, err := d2.DiskList(ctx, g.name); err != nil {
		t.Fatalf("the first call after libvirtd's restart: %v", err)
	}
	timing(t, "case 15: recovery after libvirtd's restart", t0)
	list, err := d2.ListAllSnapshots(ctx, g.name, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 1 || list[0].Name != "s1" {
		t.Fatalf("snapshots after recovery: %+v, want s1", list)
	}
	doc := persistentXML(t, dom2)
	for _, disk := range disks {
		if !strings.Contains(doc, s1[disk]) {
			t.Fatalf("libvirt's definition does not name %s after recovery:\n%s", s1[disk], doc)
		}
	}
	chains := g.chains(h2)
	for _, disk := range disks {
		g.expectChain(chains, s1[disk], g.base[disk])
		if c := g.diskList(d2)[disk].Chain; len(c) != 2 || c[0] != s1[disk] {
			t.Fatalf("xlsnap's chain of %s after recovery: %v", disk, c)
		}
	}
	var after int
	for _, disk := range disks {
		last, _ := records(t, s1[disk], disk, true)
		after = g.waitSeq(s1[disk], disk, last+2)
	}
	if err := dom2.Destroy(); err != nil {
		t.Fatal(err)
	}
	for _, disk := range disks {
		expectRecords(t, s1[disk], disk, after)
		if now := expectRecords(t, g.base[disk], disk, 3); now != frozen[disk] {
			t.Fatalf("%s: the base moved from record %d to %d", disk, frozen[disk], now)
		}
	}
}

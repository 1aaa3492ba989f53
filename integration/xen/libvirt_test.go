//go:build xen && libxl

package xen

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/xenlight"
	xlibvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
)

const xenURI = "xen:///system"

// startLibvirtd starts libvirt's daemon in dom0 (its libxl driver) unless
// it runs, and returns a connection to xen:///system.
func startLibvirtd(t *testing.T) *lv.Connect {
	t.Helper()
	if _, err := os.Stat("/run/libvirt/libvirt-sock"); err != nil {
		t0 := time.Now()
		// What systemd-tmpfiles would make on a booted system.
		for _, d := range []string{"/var/log/libvirt/libxl", "/var/lib/libvirt/libxl", "/run/libvirt"} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		// Its output to a file: the daemon keeps its stdio, and a pipe
		// would never close.
		out, err := os.Create("/var/log/libvirt/libvirtd.out")
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command("libvirtd", "-d")
		cmd.Stdout, cmd.Stderr = out, out
		err = cmd.Run()
		out.Close()
		if err != nil {
			msg, _ := os.ReadFile(out.Name())
			t.Fatalf("libvirtd -d: %v\n%s", err, msg)
		}
		deadline := time.Now().Add(2 * time.Minute)
		for {
			conn, err := lv.NewConnect(xenURI)
			if err == nil {
				timing(t, "libvirtd start", t0)
				t.Cleanup(func() { conn.Close() })
				return conn
			}
			if time.Now().After(deadline) {
				log, _ := exec.Command("sh", "-c", "grep -h ' error ' /var/log/libvirt/libvirtd.log /var/log/libvirt/libvirtd.out | tail -n 20; tail -n 20 /var/log/libvirt/libxl/libxl-driver.log").CombinedOutput()
				t.Fatalf("libvirtd: no %s after 2 min: %v\n%s", xenURI, err, log)
			}
			time.Sleep(500 * time.Millisecond)
		}
	}
	conn, err := lv.NewConnect(xenURI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// defineLibvirt defines the guest in libvirt's libxl driver: the same PV
// guest and qdisk qcow2 disks as the xl cases.
func (g *guest) defineLibvirt(conn *lv.Connect) *lv.Domain {
	t := g.t
	t.Helper()
	var xml strings.Builder
	fmt.Fprintf(&xml, `<domain type='xen'><name>%s</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='xenpv'>linux</type><kernel>/vmlinuz</kernel><initrd>/guest-initrd.img</initrd><cmdline>console=hvc0 quiet</cmdline></os>
<on_crash>destroy</on_crash><devices>
`, g.name)
	for _, d := range disks {
		fmt.Fprintf(&xml, "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='%s' bus='xen'/></disk>\n", g.base[d], d)
	}
	xml.WriteString("</devices></domain>\n")
	dom, err := conn.DomainDefineXML(xml.String())
	if err != nil {
		t.Fatalf("defining %s in libvirt: %v", g.name, err)
	}
	t.Cleanup(func() {
		dom.Destroy()
		dom.UndefineFlags(lv.DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
		dom.Free()
	})
	return dom
}

// persistentXML is libvirt's persistent definition of the domain.
func persistentXML(t *testing.T, dom *lv.Domain) string {
	t.Helper()
	doc, err := dom.GetXMLDesc(lv.DOMAIN_XML_INACTIVE)
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

// TestLibvirtXen: the lifecycle through libvirt's libxl driver
// (xen:///system): the driver reads and redefines the domain through
// libvirt, and the libvirt back end drives it, its live block work on
// libxl's QMP socket. A live disk-only snapshot; a memory snapshot, which
// libvirt takes only by saving (the domain stops) and restoring, onto the
// new overlays; a revert with memory; then, shut off, deletes merging
// through qemu-img and a start from the merged images.
func TestLibvirtXen(t *testing.T) {
	ctx := context.Background()
	conn := startLibvirtd(t)
	g := newGuest(t, "g5")
	dom := g.defineLibvirt(conn)
	t0 := time.Now()
	if err := dom.Create(); err != nil {
		t.Fatalf("starting %s through libvirt: %v\n%s", g.name, err, g.console())
	}
	timing(t, g.name+": virDomainCreate", t0)
	g.waitConnected()
	for _, disk := range disks {
		g.waitSeq(g.base[disk], disk, 3)
	}
	h := xlibvirt.New(conn)
	src, err := libvirtsource.Open(xenURI)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	d, err := driver.Open(ctx, driver.Config{StateDir: filepath.Join(workDir, g.name, "state"), Source: src, Pools: []string{g.dir}, Hypervisor: h})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })

	// case 8a: live disk-only snapshot through libvirt + libxl's QMP.
	req, s1 := g.externalRequest("s1")
	t0 = time.Now()
	if _, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly|driver.CreateAtomic); err != nil {
		t.Fatalf("live snapshot through libvirt: %v\n%s", err, g.console())
	}
	timing(t, "case 8a: libvirt live disk-only snapshot", t0)
	chains := g.chains(h)
	frozen := map[string]int{}
	for _, disk := range disks {
		g.expectChain(chains, s1[disk], g.base[disk])
		frozen[disk], _ = records(t, g.base[disk], disk, true)
		g.waitSeq(s1[disk], disk, frozen[disk]+2)
	}
	if doc := persistentXML(t, dom); !strings.Contains(doc, s1["xvda"]) || !strings.Contains(doc, s1["xvdb"]) {
		t.Fatalf("libvirt's definition does not name the overlays:\n%s", doc)
	}

	// case 8f: the storage admin's move through xen:///system: xvda's
	// base, now s1's state, is copied to other storage and the hook
	// told; the device model reads the copy, the old file goes at once,
	// the guest writes on, and s1's record names the copy.
	moved := filepath.Join(g.dir, "moved")
	run(t, "mkdir", "-p", moved)
	newBase := filepath.Join(moved, filepath.Base(g.base["xvda"]))
	run(t, "cp", "--sparse=always", g.base["xvda"], newBase)
	t0 = time.Now()
	if err := d.ChainChanged(ctx, g.name, "xvda", driver.Move{From: g.base["xvda"], To: newBase}); err != nil {
		t.Fatalf("rescan with the base moved, through libvirt: %v\n%s", err, g.console())
	}
	timing(t, "case 8f: libvirt rescan with a move", t0)
	oldBase := g.base["xvda"]
	run(t, "rm", oldBase)
	g.base["xvda"] = newBase
	g.expectChain(g.chains(h), s1["xvda"], newBase)
	if out := run(t, "qemu-img", "info", "-U", "-f", "qcow2", s1["xvda"]); !strings.Contains(out, "backing file: "+newBase+"\n") {
		t.Fatalf("%s after the move:\n%s", s1["xvda"], out)
	}
	if c := g.diskList(d)["xvda"].Chain; !slices.Equal(c, []string{s1["xvda"], newBase}) {
		t.Fatalf("xlsnap's chain of xvda after the move: %v", c)
	}
	// s1's definition of its time, which a revert writes back, too.
	if doc, err := d.SnapshotGetXMLDesc(ctx, g.name, "s1", 0); err != nil || !strings.Contains(doc, "<source file='"+newBase+"'/>") || strings.Contains(doc, "'"+oldBase+"'") {
		t.Fatalf("s1's record after the move (%v):\n%s", err, doc)
	}
	last, _ := records(t, s1["xvda"], "xvda", true)
	g.waitSeq(s1["xvda"], "xvda", last+2)
	if now, _ := records(t, newBase, "xvda", true); now != frozen["xvda"] {
		t.Fatalf("the moved base holds record %d, s1 froze it at %d", now, frozen["xvda"])
	}

	// case 8b: a memory snapshot. libvirt saves only by stopping the
	// domain; it is restored onto the new overlays, whose definition
	// the back end writes into libvirt's save image.
	mem := filepath.Join(workDir, g.name, "m1.save")
	req, m1 := g.externalRequest("m1")
	req.Memory, req.MemoryPath = true, mem
	t0 = time.Now()
	if _, err := d.CreateSnapshot(ctx, g.name, req, 0); err != nil {
		t.Fatalf("memory snapshot through libvirt: %v\n%s", err, g.console())
	}
	timing(t, "case 8b: libvirt memory snapshot (save, restore)", t0)
	if st, err := h.State(ctx, g.name); err != nil || st != xenlight.Running {
		t.Fatalf("after the memory snapshot the domain is %s (%v), want running", st, err)
	}
	chains = g.chains(h)
	saved := map[string]int{}
	for _, disk := range disks {
		g.expectChain(chains, m1[disk], s1[disk], g.base[disk])
		saved[disk], _ = records(t, s1[disk], disk, true)
		g.waitSeq(m1[disk], disk, saved[disk]+3)
		if now, _ := records(t, s1[disk], disk, true); now != saved[disk] {
			t.Fatalf("%s: %s moved from record %d to %d after the restore: the guest writes below its overlay", disk, s1[disk], saved[disk], now)
		}
	}

	// case 8c: revert with memory, --running.
	t0 = time.Now()
	if err := d.RevertToSnapshot(ctx, g.name, "m1", driver.RevertRunning); err != nil {
		t.Fatalf("revert through libvirt: %v\n%s", err, g.console())
	}
	timing(t, "case 8c: libvirt revert with memory", t0)
	chains = g.chains(h)
	active := map[string]string{}
	var after int
	for _, disk := range disks {
		active[disk] = g.diskList(d)[disk].Source
		g.expectChain(chains, active[disk], s1[disk], g.base[disk])
		after = g.waitSeq(active[disk], disk, saved[disk]+3)
	}
	t0 = time.Now()
	if err := dom.Destroy(); err != nil {
		t.Fatal(err)
	}
	timing(t, g.name+": virDomainDestroy", t0)
	for _, disk := range disks {
		expectRecords(t, active[disk], disk, after)
		if now, _ := records(t, g.base[disk], disk, false); now != frozen[disk] {
			t.Fatalf("%s: the base moved from record %d to %d", disk, frozen[disk], now)
		}
	}

	// case 8d: shut off: delete both snapshots (qemu-img merges), then
	// start from libvirt's rewritten definition.
	t0 = time.Now()
	for _, name := range []string{"m1", "s1"} {
		if _, err := d.SnapshotDelete(ctx, g.name, name, 0); err != nil {
			t.Fatalf("offline delete %s: %v", name, err)
		}
	}
	timing(t, "case 8d: libvirt offline delete of 2 snapshots", t0)
	if left, err := d.ListAllSnapshots(ctx, g.name, 0); err != nil || len(left) != 0 {
		t.Fatalf("snapshots left: %v %v", left, err)
	}
	for _, disk := range disks {
		di := g.diskList(d)[disk]
		if len(di.Chain) != 1 {
			t.Fatalf("%s: chain %v after deleting every snapshot", disk, di.Chain)
		}
		active[disk] = di.Source
		expectRecords(t, di.Source, disk, after)
	}
	t0 = time.Now()
	if err := dom.Create(); err != nil {
		t.Fatalf("restarting through libvirt: %v\n%s", err, g.console())
	}
	g.waitConnected()
	timing(t, g.name+": restart on the merged images", t0)
	chains = g.chains(h)
	for _, disk := range disks {
		g.expectChain(chains, active[disk])
	}

	// case 8e: a memory snapshot killed once libvirt's save stopped the
	// domain, before its disks: the next driver restores it from the
	// memory just saved (its disks are what the memory saw), then drops
	// the image no snapshot holds.
	cmem := filepath.Join(workDir, g.name, "c8.save")
	req, _ = g.externalRequest("c8")
	req.Memory, req.MemoryPath = true, cmem
	crashIn(t, "guest-snapshot/stopped", func() error { _, err := d.CreateSnapshot(ctx, g.name, req, 0); return err })
	if st, _ := h.State(ctx, g.name); st != xenlight.Shutoff {
		t.Fatalf("killed after the save: the domain is %s, want shut off", st)
	}
	d2, err := driver.Open(ctx, driver.Config{StateDir: filepath.Join(workDir, g.name, "state"), Source: src, Pools: []string{g.dir}, Hypervisor: h})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d2.Close() })
	t0 = time.Now()
	g.diskList(d2)
	timing(t, "case 8e: recovery restores the stopped domain", t0)
	if st, _ := h.State(ctx, g.name); st != xenlight.Running {
		t.Fatalf("after recovery the domain is %s, want running\n%s", st, g.console())
	}
	if _, err := os.Stat(cmem); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the memory image no snapshot holds is still there: %v", err)
	}
	for _, disk := range disks {
		last, _ := records(t, active[disk], disk, true)
		g.waitSeq(active[disk], disk, last+3)
	}
	if err := dom.Destroy(); err != nil {
		t.Fatal(err)
	}
	for _, disk := range disks {
		run(t, "qemu-img", "check", "-q", active[disk])
	}
}

//go:build xen && libxl

package xen

import (
	"context"
	"errors"
	"net"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/serve"
	"github.com/xlsnap/xlsnap/xenlight"
	xlibvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
)

// pythonSnapshots drives the stock libvirt-python binding: a disk-only
// snapshot p1 of the running domain, the names, a forced revert to p1 (the
// domain stops) and its delete, printing the names after each.
const pythonSnapshots = `import sys, libvirt
c = libvirt.open(sys.argv[1])
d = c.lookupByName(sys.argv[2])
s = d.snapshotCreateXML("<domainsnapshot><name>p1</name></domainsnapshot>", libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
print(" ".join(sorted(x.getName() for x in d.listAllSnapshots())))
d.revertToSnapshot(s, libvirt.VIR_DOMAIN_SNAPSHOT_REVERT_FORCE)
print(d.state()[0] == libvirt.VIR_DOMAIN_SHUTOFF)
s.delete()
print(" ".join(sorted(x.getName() for x in d.listAllSnapshots())))
`

// TestServeXen: `xlsnap serve` (the serve package, in this process) in
// front of libvirtd's libxl driver; the stock virsh and libvirt-python,
// through its socket only, take, list, revert and delete snapshots of a
// running Xen domain. Every other call (list, start, destroy) is relayed
// to libvirtd. The guest's records are read back from the images.
func TestServeXen(t *testing.T) {
	for _, bin := range []string{"virsh", "python3"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Fatalf("%s is not in the dom0 image (image/packages.txt)", bin)
		}
	}
	ctx := context.Background()
	conn := startLibvirtd(t)
	g := newGuest(t, "g7")
	g.defineLibvirt(conn)

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
	const upstream = "/run/libvirt/libvirt-sock"
	access, err := serve.AccessOf(upstream)
	if err != nil {
		t.Fatal(err)
	}
	srv := serve.New(serve.Config{Driver: d, Source: src, Hypervisor: h, Upstream: upstream, Logf: t.Logf})
	sock := filepath.Join(workDir, g.name, "xlsnap-sock")
	l, err := serve.Listen(sock, access)
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l, false, serve.PeerCheck(access)) }()
	t.Cleanup(func() {
		l.Close()
		if err := <-served; err != nil && !errors.Is(err, net.ErrClosed) {
			t.Errorf("serving: %v", err)
		}
		srv.Close()
	})
	uri := "xen+unix:///system?socket=" + sock
	virsh := func(args ...string) string {
		t.Helper()
		t0 := time.Now()
		out, err := exec.Command("virsh", append([]string{"-c", uri}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("virsh %v: %v\n%s\n%s", args, err, out, g.console())
		}
		timing(t, "serve: virsh "+args[0], t0)
		return string(out)
	}
	active := func() map[string]string {
		out := map[string]string{}
		for disk, di := range g.diskList(d) {
			out[disk] = di.Source
		}
		return out
	}

	virsh("start", g.name) // relayed
	g.waitConnected()
	for _, disk := range disks {
		g.waitSeq(g.base[disk], disk, 3)
	}
	if out := virsh("list"); !slices.ContainsFunc(strings.Split(out, "\n"), func(line string) bool {
		f := strings.Fields(line)
		return len(f) == 3 && f[1] == g.name && f[2] == "running"
	}) {
		t.Fatalf("relayed list:\n%s", out)
	}

	// Two live disk-only snapshots: the device model writes to each
	// new overlay in turn, the one below stops moving.
	if out := virsh("snapshot-create-as", g.name, "s1", "--disk-only"); out != "Domain snapshot s1 created\n" {
		t.Fatalf("create s1: %q", out)
	}
	s1 := active()
	frozen := map[string]int{}
	chains := g.chains(h)
	for _, disk := range disks {
		g.expectChain(chains, s1[disk], g.base[disk])
		frozen[disk], _ = records(t, g.base[disk], disk, true)
		g.waitSeq(s1[disk], disk, frozen[disk]+2)
	}
	virsh("snapshot-create-as", g.name, "s2", "--disk-only")
	s2 := active()
	chains = g.chains(h)
	for _, disk := range disks {
		g.expectChain(chains, s2[disk], s1[disk], g.base[disk])
		last, _ := records(t, s1[disk], disk, true)
		g.waitSeq(s2[disk], disk, last+2)
	}
	if out := virsh("snapshot-list", g.name, "--tree"); out != "s1\n  |\n  +- s2\n    \n\n" {
		t.Fatalf("tree: %q", out)
	}

	// A disk-only snapshot holds no memory: the revert stops the
	// domain, so virsh needs --force; the disks are s1's, the base as
	// it was when s1 was taken.
	virsh("snapshot-revert", g.name, "s1", "--force")
	if st, err := h.State(ctx, g.name); err != nil || st != xenlight.Shutoff {
		t.Fatalf("after the forced revert the domain is %s (%v), want shut off", st, err)
	}
	reverted := active()
	for _, disk := range disks {
		if last := expectRecords(t, reverted[disk], disk, frozen[disk]); last != frozen[disk] {
			t.Fatalf("%s after the revert to s1: record %d, want s1's %d", disk, last, frozen[disk])
		}
	}
	virsh("snapshot-delete", g.name, "s2")
	if out := virsh("snapshot-list", g.name, "--name"); out != "s1\n\n" {
		t.Fatalf("after deleting s2: %q", out)
	}

	// The reverted definition starts (relayed) and the guest writes on
	// from s1's records.
	virsh("start", g.name)
	g.waitConnected()
	for _, disk := range disks {
		g.waitSeq(reverted[disk], disk, frozen[disk]+3)
	}

	// libvirt-python through the same socket.
	t0 := time.Now()
	out, err := exec.Command("python3", "-c", pythonSnapshots, uri, g.name).CombinedOutput()
	if err != nil || string(out) != "p1 s1\nTrue\ns1\n" {
		t.Fatalf("libvirt-python: %v\n%s\n%s", err, out, g.console())
	}
	timing(t, "serve: libvirt-python create, list, revert, delete", t0)
	for disk, image := range active() {
		expectRecords(t, image, disk, frozen[disk]+3)
	}
}

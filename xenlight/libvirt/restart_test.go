package libvirt_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	lv "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/xenlight"
	xlvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// TestLibvirtdRestart kills the libvirt daemon in the middle of live
// disk-only snapshots of a running QEMU domain (issue #14: libvirtd
// restarted during a live snapshot through the libvirt back end), at the
// three places the daemon has a part in one: as the device model is
// looked up (before QEMU switches to the overlay), and as the definition
// step rewrites the definition, before the daemon sees it and once it
// did it but before its answer. The xlsnap that meets the faults is a
// long-lived one (as xlsnap serve is): one driver over one source and
// back end throughout; the last fault is recovered by a new one, as by
// the next command. Each time: the call ends in a typed error
// (ErrNoConnection, never libvirt's internal error); a call while the daemon is
// down is refused at once, typed, and changes nothing; the domain runs on
// under the restarted daemon; the next call finishes or undoes the
// intent, judged from what QEMU reads; libvirt's definition, xlsnap's
// record and QEMU agree on the exact chain; and every write of the guest,
// before and after, reads back from the images once it is stopped. A
// daemon that hangs (SIGSTOP) fails the call after the keepalive's bound
// and is used again once it answers.
func TestLibvirtdRestart(t *testing.T) {
	if _, err := exec.LookPath("qemu-io"); err != nil {
		t.Skip("qemu-io not installed: no libvirtd restart test")
	}
	s := xlvirt.StartSession(t)
	ctx := context.Background()
	dir := s.Images()
	base := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "16M")
	qemuIO(t, base, "write -P 0x11 0 64k")
	if os.Getuid() == 0 {
		// The daemon's QEMU runs as nobody and creates the overlays.
		for _, p := range []string{dir, base} {
			if err := os.Lchown(p, 65534, 65534); err != nil {
				t.Fatal(err)
			}
		}
	}
	monitor := filepath.Join(dir, "r.qmp")
	withDaemon(t, s.URI(), func(c *lv.Connect) {
		dom, err := c.DomainDefineXML(xlvirt.QEMUDomainQMPXML("r", "3b0f7c52-9d1e-4a86-b2c4-7e5d1f0a9c83", base, monitor))
		if err != nil {
			t.Fatal(err)
		}
		defer dom.Free()
		if err := dom.Create(); err != nil {
			t.Fatal(err)
		}
	})
	// QEMU outlives its daemon: whatever becomes of the daemon, the
	// test's QEMU goes with the test.
	pid := qemuPID(t, s)
	t.Cleanup(func() {
		// Only while the pid is still that QEMU's.
		if cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid)); err == nil && strings.Contains(string(cmd), monitor) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})

	proxySock := filepath.Join(t.TempDir(), "lv.sock")
	proxy := startRPCProxy(t, proxySock, s.Socket())
	uri := "qemu+unix:///session?socket=" + proxySock
	kill := func() { proxy.Down(); s.Kill() }
	restart := func() { s.Start(); proxy.Up() }

	// xlsnap opens its driver as cmd/xlsnap does: a source over one
	// connection, the back end through the same; each a new xlsnap, on
	// the one state folder.
	state := t.TempDir()
	xlsnap := func(ka xlvirt.Keepalive) *driver.Driver {
		t.Helper()
		conn, err := xlvirt.Dial(uri, ka)
		if err != nil {
			t.Fatal(err)
		}
		src := libvirtsource.New(conn)
		t.Cleanup(func() { src.Close() })
		d, err := driver.Open(ctx, driver.Config{StateDir: state, Source: src, Pools: []string{dir}, Hypervisor: xlvirt.New(src.Conn())})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d
	}
	d := xlsnap(xlvirt.DefaultKeepalive)

	guestWrite(t, monitor, 0x22, 64<<10)
	snapshot := func(name string) (time.Duration, error) {
		start := time.Now()
		_, err := d.SnapshotCreateXML(ctx, "r", "<domainsnapshot><name>"+name+"</name></domainsnapshot>", driver.CreateDiskOnly)
		return time.Since(start), err
	}
	// typed: the failure says what it is, with a code other than
	// libvirt's internal error, and that the connection was lost.
	typed := func(what string, err error) {
		t.Helper()
		if err == nil {
			t.Fatalf("%s: no error", what)
		}
		if c := driver.Code(err); c == errdefs.CodeInternal || !errors.Is(err, xlvirt.ErrNoConnection) || !errors.Is(err, errdefs.ErrHypervisor) {
			t.Fatalf("%s: %v (code %d): want ErrNoConnection, not an internal error", what, err, c)
		}
	}
	// agree: libvirt's definition, xlsnap's record and QEMU read chain,
	// top first, and the snapshots are snaps.
	agree := func(d *driver.Driver, chain []string, snaps ...string) {
		t.Helper()
		disks, err := d.DiskList(ctx, "r")
		if err != nil {
			t.Fatal(err)
		}
		if len(disks) != 1 || disks[0].Source != chain[0] || !slices.Equal(disks[0].Chain, chain) || disks[0].Pending != "" {
			t.Fatalf("xlsnap's disks %+v; want vda on %v", disks, chain)
		}
		if got := definedSource(t, s.URI()); got != chain[0] {
			t.Fatalf("libvirt's definition names %s; want %s", got, chain[0])
		}
		if got := deviceModelChain(t, monitor); !slices.Equal(got, chain) {
			t.Fatalf("QEMU reads %v; want %v", got, chain)
		}
		list, err := d.ListAllSnapshots(ctx, "r", 0)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, sn := range list {
			names = append(names, sn.Name)
		}
		if !slices.Equal(names, snaps) {
			t.Fatalf("snapshots %v; want %v", names, snaps)
		}
		if st := domainState(t, s.URI()); st != lv.DOMAIN_RUNNING {
			t.Fatalf("the domain is in state %d under the restarted daemon, not running", st)
		}
		if got := qemuPID(t, s); got != pid {
			t.Fatalf("the domain's QEMU is pid %d; the daemon started it as %d", got, pid)
		}
	}
	// back restarts the daemon and times the first call after it (by
	// the xlsnap next gives: the long-lived one, or a new one it opens),
	// which finds the journal's intent and finishes or undoes it.
	back := func(what string, next func() *driver.Driver, chain []string, snaps ...string) {
		t.Helper()
		start := time.Now()
		restart()
		up := time.Since(start)
		start = time.Now()
		d := next()
		if _, err := d.DiskList(ctx, "r"); err != nil {
			t.Fatalf("%s: the first call after the restart: %v", what, err)
		}
		t.Logf("%s: the daemon took connections %v after its start; the first call after it recovered in %v", what, up, time.Since(start))
		agree(d, chain, snaps...)
	}
	longLived := func() *driver.Driver { return d }
	fresh := func() *driver.Driver { return xlsnap(xlvirt.DefaultKeepalive) }
	files := func() []string {
		t.Helper()
		ents, err := os.ReadDir(dir)
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, e := range ents {
			out = append(out, e.Name())
		}
		return out
	}
	ob, oc := filepath.Join(dir, "base.b"), filepath.Join(dir, "base.c")

	key, err := d.DomainKey(ctx, "r")
	if err != nil {
		t.Fatal(err)
	}
	pending := func() []string {
		t.Helper()
		p, err := d.Storage().Pending(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}

	// 1. Killed as the back end asks libvirt for the device model
	// (the live XML, flags 0): QEMU never switched; the intent is
	// undone.
	before := files()
	fired := proxy.At(procDomainGetXMLDesc, 0, false, kill)
	took, err := snapshot("a")
	<-fired
	typed("snapshot a, daemon killed at the device model's lookup", err)
	t.Logf("a: typed error (code %d) after %v: %v", driver.Code(err), took, err)
	if got := deviceModelChain(t, monitor); !slices.Equal(got, []string{base}) {
		t.Fatalf("QEMU reads %v after a failed snapshot; want [%s]", got, base)
	}
	// While the daemon is down: refused at once, nothing changes.
	journal := pending()
	if len(journal) != 1 {
		t.Fatalf("the journal holds %q after a's failure; want its intent", journal)
	}
	took, err = snapshot("down")
	typed("a snapshot while the daemon is down", err)
	if !strings.Contains(err.Error(), "Connection refused") {
		t.Fatalf("a snapshot while the daemon is down: %v; want libvirt's refused connection", err)
	}
	t.Logf("down: typed error (code %d) after %v: %v", driver.Code(err), took, err)
	start := time.Now()
	_, err = libvirtsource.Open(uri)
	if driver.Code(err) != errdefs.CodeSystemError {
		t.Fatalf("a new source while the daemon is down: %v (code %d); want VIR_ERR_SYSTEM_ERROR", err, driver.Code(err))
	}
	t.Logf("a new connection while the daemon is down: refused after %v: %v", time.Since(start), err)
	if got := files(); !slices.Equal(got, before) {
		t.Fatalf("files %v after failed snapshots; want %v", got, before)
	}
	if got := pending(); !slices.Equal(got, journal) {
		t.Fatalf("the journal holds %q after a call while the daemon was down; want %q", got, journal)
	}
	back("a", longLived, []string{base})
	if got := pending(); len(got) != 0 {
		t.Fatalf("the journal holds %q after the recovery", got)
	}
	if got := files(); !slices.Equal(got, before) {
		t.Fatalf("files %v after the recovery; want %v", got, before)
	}

	// 2. Killed as the definition step reaches the daemon, which never
	// sees it: QEMU writes the overlay; the intent is finished.
	fired = proxy.At(procDomainDefineXML, anyFlags, false, kill)
	took, err = snapshot("b")
	<-fired
	typed("snapshot b, daemon killed before the definition step", err)
	t.Logf("b: typed error (code %d) after %v: %v", driver.Code(err), took, err)
	// The guest writes on while its daemon is down, to the new overlay.
	guestWrite(t, monitor, 0x55, 256<<10)
	back("b", longLived, []string{ob, base}, "b")
	guestWrite(t, monitor, 0x33, 128<<10)

	// 3. Killed once the daemon wrote the definition, before its answer;
	// a new xlsnap (as the next command is) finds the intent.
	fired = proxy.At(procDomainDefineXML, anyFlags, true, kill)
	took, err = snapshot("c")
	<-fired
	typed("snapshot c, daemon killed after the definition step", err)
	t.Logf("c: typed error (code %d) after %v: %v", driver.Code(err), took, err)
	back("c", fresh, []string{oc, ob, base}, "b", "c")
	agree(d, []string{oc, ob, base}, "b", "c")
	guestWrite(t, monitor, 0x44, 192<<10)

	// 4. An xlsnap whose keepalive gives a hung daemon 3 s. The daemon
	// hangs: the call gives up, typed, after at most twice that (the
	// lost connection's keepalive, then the new connection's bound);
	// once the daemon answers again, so does xlsnap.
	ka := xlvirt.Keepalive{Interval: 1, Count: 2}
	d2 := xlsnap(ka)
	agree(d2, []string{oc, ob, base}, "b", "c")
	s.Signal(syscall.SIGSTOP)
	start = time.Now()
	_, err = d2.DiskList(ctx, "r")
	took = time.Since(start)
	s.Signal(syscall.SIGCONT)
	typed("a call on a hung daemon", err)
	t.Logf("hung: typed error (code %d) after %v (keepalive bound %v): %v", driver.Code(err), took, ka.Bound(), err)
	// The open the hang left in flight lands once the daemon answers;
	// until it has, a call fails at once rather than wait again.
	start = time.Now()
	for fast := 0; ; fast++ {
		_, err := d2.DiskList(ctx, "r")
		if err == nil {
			t.Logf("hung: answered again %v after SIGCONT (%d calls failed at once before)", time.Since(start), fast)
			break
		}
		typed("a call as the hung daemon comes back", err)
		if time.Since(start) > ka.Bound() {
			t.Fatalf("the daemon answers again, xlsnap not after %v: %v", time.Since(start), err)
		}
		time.Sleep(10 * time.Millisecond)
	}
	agree(d2, []string{oc, ob, base}, "b", "c")
	agree(d, []string{oc, ob, base}, "b", "c")

	// The guest stops; every write reads back where it belongs.
	withDaemon(t, s.URI(), func(c *lv.Connect) {
		dom, err := c.LookupDomainByName("r")
		if err != nil {
			t.Fatal(err)
		}
		defer dom.Free()
		if err := dom.Destroy(); err != nil {
			t.Fatal(err)
		}
	})
	for _, img := range []string{base, ob, oc} {
		if out, err := exec.Command("qemu-img", "check", "-q", img).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img check %s: %v\n%s", img, err, out)
		}
	}
	for img, reads := range map[string][]string{
		oc:   {"read -P 0x11 0 64k", "read -P 0x22 64k 64k", "read -P 0x33 128k 64k", "read -P 0x44 192k 64k", "read -P 0x55 256k 64k"},
		ob:   {"read -P 0x11 0 64k", "read -P 0x22 64k 64k", "read -P 0x33 128k 64k", "read -P 0 192k 64k", "read -P 0x55 256k 64k"},
		base: {"read -P 0x11 0 64k", "read -P 0x22 64k 64k", "read -P 0 128k 192k"},
	} {
		for _, r := range reads {
			qemuIO(t, img, r)
		}
	}
}

// withDaemon runs fn on a connection of the test's own to the daemon.
func withDaemon(t *testing.T, uri string, fn func(*lv.Connect)) {
	t.Helper()
	c, err := lv.NewConnect(uri)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fn(c)
}

// definedSource is the source of vda in the domain's persistent
// definition, as libvirt holds it.
func definedSource(t *testing.T, uri string) string {
	t.Helper()
	var doc string
	withDaemon(t, uri, func(c *lv.Connect) {
		dom, err := c.LookupDomainByName("r")
		if err != nil {
			t.Fatal(err)
		}
		defer dom.Free()
		if doc, err = dom.GetXMLDesc(lv.DOMAIN_XML_INACTIVE); err != nil {
			t.Fatal(err)
		}
	})
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	return def.Devices.Disks[0].Source.File.File
}

func domainState(t *testing.T, uri string) lv.DomainState {
	t.Helper()
	var st lv.DomainState
	withDaemon(t, uri, func(c *lv.Connect) {
		dom, err := c.LookupDomainByName("r")
		if err != nil {
			t.Fatal(err)
		}
		defer dom.Free()
		if st, _, err = dom.GetState(); err != nil {
			t.Fatal(err)
		}
	})
	return st
}

// qemuPID is the pid of the domain's QEMU, from the daemon's pid file.
func qemuPID(t *testing.T, s interface{ Socket() string }) int {
	t.Helper()
	run := filepath.Dir(filepath.Dir(s.Socket())) // XDG_RUNTIME_DIR
	b, err := os.ReadFile(filepath.Join(run, "libvirt", "qemu", "run", "r.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// deviceModelChain is vda's chain as the running QEMU reads it, top
// first, through the domain's second monitor.
func deviceModelChain(t *testing.T, monitor string) []string {
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

// guestWrite writes 64 KiB of pattern at off through the running QEMU's
// disk device, as the guest's own writes go (to whatever image is on top
// now), and flushes them.
func guestWrite(t *testing.T, monitor string, pattern byte, off int) {
	t.Helper()
	ctx := context.Background()
	m, err := qmp.Dial(ctx, "unix", monitor)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	for _, c := range []string{fmt.Sprintf("write -P 0x%02x %d 64k", pattern, off), "flush"} {
		var out string
		cmd := fmt.Sprintf("qemu-io -d /machine/peripheral/virtio-disk0/virtio-backend %q", c)
		if err := m.Execute(ctx, "human-monitor-command", map[string]any{"command-line": cmd}, &out); err != nil || strings.TrimSpace(out) != "" {
			t.Fatalf("%s: %v %s", cmd, err, out)
		}
	}
}

func qemuImg(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
	}
}

// qemuIO runs one qemu-io command on img, failing on a mismatch (qemu-io
// exits 0 for a "Pattern verification failed", so its output is read).
func qemuIO(t *testing.T, img, cmd string) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, img).CombinedOutput()
	if err != nil || strings.Contains(string(out), "failed") || strings.Contains(string(out), "rror") {
		t.Fatalf("qemu-io %s %q: %v\n%s", img, cmd, err, out)
	}
}

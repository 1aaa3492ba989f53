package main

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// relayNobody is the unprivileged user the session daemon runs as when
// the tests run as root (libvirtd as root would be the system daemon).
const relayNobody = 65534

// sessionLibvirtd starts a private libvirtd session daemon (its own HOME
// and sockets in a temporary folder) and returns its socket.
func sessionLibvirtd(t testing.TB) string {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: no libvirtd session daemon")
	}
	if _, err := exec.LookPath("libvirtd"); err != nil {
		t.Skip("libvirtd is not installed: no relay test")
	}
	dir, err := os.MkdirTemp("", "xlsnap-relay-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.MkdirAll(filepath.Join(dir, "run"), 0o755); err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	// QEMU's output straight to a file: no virtlogd, which the daemon
	// would otherwise start and leave running after it is killed.
	conf := filepath.Join(dir, ".config", "libvirt")
	if err := os.MkdirAll(conf, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(conf, "qemu.conf"), []byte("stdio_handler = \"file\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	env := []string{"HOME=" + dir, "XDG_RUNTIME_DIR=" + dir + "/run", "XDG_CONFIG_HOME=" + dir + "/.config",
		"XDG_CACHE_HOME=" + dir + "/.cache", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
	args := []string{"libvirtd", "--timeout=120"} // exits on its own if the test dies
	if os.Getuid() == 0 {
		if _, err := exec.LookPath("setpriv"); err != nil {
			t.Skip("running as root without setpriv: no unprivileged session daemon")
		}
		args = append([]string{"setpriv", fmt.Sprintf("--reuid=%d", relayNobody), fmt.Sprintf("--regid=%d", relayNobody), "--clear-groups"}, args...)
		if err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
			if err != nil {
				return err
			}
			return os.Lchown(p, relayNobody, relayNobody)
		}); err != nil {
			t.Fatal(err)
		}
	}
	probe := exec.Command(args[0], append(slices.Clone(args[1:len(args)-1]), "--version")...)
	probe.Env = env
	if out, err := probe.CombinedOutput(); err != nil {
		t.Skipf("the unprivileged user cannot run libvirtd here: %v: %s", err, out)
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Env = env
	var log bytes.Buffer
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	sock := filepath.Join(dir, "run", "libvirt", "libvirt-sock")
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			return sock
		}
		if time.Now().After(deadline) {
			t.Fatalf("libvirtd made no socket %s in 20 s", sock)
		}
	}
}

// startRelay runs `xlsnap --connect connect --pool pool serve --upstream
// upstream` on a socket in pool and returns the socket once it answers.
func startRelay(t testing.TB, connect, upstream, pool string) string {
	t.Helper()
	sock := filepath.Join(pool, "relay.sock")
	srv := exec.Command(os.Args[0], "--connect", connect, "--state-dir", t.TempDir(),
		"--pool", pool, "serve", "--socket", sock, "--upstream", upstream)
	srv.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1")
	var logs bytes.Buffer
	srv.Stdout, srv.Stderr = &logs, &logs
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Process.Signal(syscall.SIGTERM)
		srv.Wait()
		if t.Failed() {
			t.Logf("xlsnap serve:\n%s", &logs)
		}
	})
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", sock); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no relay socket:\n%s", &logs)
		}
	}
	return sock
}

// TestServeRelay puts `xlsnap serve --upstream` in front of a session
// libvirtd (its test driver): the domain calls are the daemon's,
// relayed; the snapshot calls are the driver's, over a connection to the
// same daemon. It logs virsh's whole-process time through the relay
// against the daemon directly.
func TestServeRelay(t *testing.T) {
	upstream := sessionLibvirtd(t)
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "web.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "16M")
	serveQemuIO(t, img, "write -P 0x11 0 64k")
	def := filepath.Join(dir, "web.xml")
	if err := os.WriteFile(def, fmt.Appendf(nil, `<domain type='test'><name>web</name><memory>262144</memory><vcpu>1</vcpu><os><type arch='x86_64'>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='vda' bus='virtio'/></disk>
</devices></domain>`, img), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := startRelay(t, "test+unix:///default?socket="+upstream, upstream, dir)
	// The relay's socket is the daemon's user's, with the daemon's mode.
	want, _ := os.Stat(upstream)
	got, _ := os.Stat(sock)
	if got.Mode() != want.Mode() || got.Sys().(*syscall.Stat_t).Uid != want.Sys().(*syscall.Stat_t).Uid {
		t.Errorf("relay socket %v uid %d, daemon's %v uid %d", got.Mode(), got.Sys().(*syscall.Stat_t).Uid, want.Mode(), want.Sys().(*syscall.Stat_t).Uid)
	}

	virsh := func(sock string, args ...string) string {
		t.Helper()
		out, err := exec.Command("virsh", append([]string{"-c", "test+unix:///default?socket=" + sock}, args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("virsh %v: %v\n%s", args, err, out)
		}
		return string(out)
	}
	virsh(sock, "define", def)
	if out := virsh(sock, "list", "--all"); !strings.Contains(out, " -    web    shut off") || !strings.Contains(out, "test   running") {
		t.Fatalf("relayed list:\n%s", out)
	}
	if out := virsh(sock, "snapshot-create-as", "web", "s1", "--disk-only"); out != "Domain snapshot s1 created\n" {
		t.Fatalf("create: %q", out)
	}
	// The daemon's definition (relayed dumpxml) names the overlay the
	// driver made and defined through its own connection.
	overlay := filepath.Join(dir, "web.s1")
	if out := virsh(upstream, "domblklist", "web"); !strings.Contains(out, overlay) {
		t.Fatalf("daemon's disk after the snapshot:\n%s", out)
	}
	serveQemuIO(t, overlay, "write -P 0x22 0 64k")
	virsh(sock, "snapshot-create-as", "web", "s2", "--disk-only")
	if out := virsh(sock, "snapshot-list", "web", "--tree"); out != "s1\n  |\n  +- s2\n    \n\n" {
		t.Fatalf("tree: %q", out)
	}
	virsh(sock, "snapshot-revert", "web", "s1")
	virsh(sock, "snapshot-delete", "web", "s2")
	for _, line := range strings.Split(virsh(sock, "domblklist", "web"), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "vda" {
			serveQemuIO(t, f[1], "read -P 0x11 0 64k")
		}
	}

	// Whole-process latency of a relayed call, interleaved so drift in
	// the machine's load falls on both alike.
	const runs = 20
	var direct, relayed time.Duration
	for range runs {
		for _, s := range []struct {
			sock string
			sum  *time.Duration
		}{{upstream, &direct}, {sock, &relayed}} {
			start := time.Now()
			virsh(s.sock, "list")
			*s.sum += time.Since(start)
		}
	}
	t.Logf("virsh list, whole process, mean of %d: direct %v, through xlsnap serve %v (%.2fx)",
		runs, direct/runs, relayed/runs, float64(relayed)/float64(direct))
}

// TestServeRelayPeerCredentials runs the stock virsh as users other than
// the test's (root) against a relay in front of a session daemon, whose
// socket is its user's only: that user is served, another user is
// refused by the relay as by the daemon, and still refused by the
// relay's own check of SO_PEERCRED once its socket is opened to all with
// chmod. A session daemon makes no read-only socket (libvirtd creates
// PATH-ro only when privileged), so --socket-ro in front of it fails at
// start rather than relay read-only clients to a read-write socket.
func TestServeRelayPeerCredentials(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("not root: cannot run clients as other users")
	}
	if _, err := exec.LookPath("setpriv"); err != nil {
		t.Skip("no setpriv: cannot run clients as other users")
	}
	upstream := sessionLibvirtd(t)
	// Every user must reach the sockets' folder; only the sockets' own
	// rules decide.
	dir, err := os.MkdirTemp("", "xlsnap-relayc-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	connect := "test+unix:///default?socket=" + upstream
	sock := startRelay(t, connect, upstream, dir)
	const other = 4321 // a uid and gid no one on the machine uses
	virshAs := func(uid int, sock string) (string, error) {
		cmd := exec.Command("setpriv", fmt.Sprintf("--reuid=%d", uid), fmt.Sprintf("--regid=%d", uid), "--clear-groups",
			"virsh", "-c", "test+unix:///default?socket="+sock, "list", "--all")
		cmd.Env = []string{"HOME=" + dir, "PATH=/usr/sbin:/usr/bin:/sbin:/bin"}
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	for _, c := range []struct {
		who  string
		uid  int
		sock string
		ok   bool
	}{
		{"the daemon's user, directly", relayNobody, upstream, true},
		{"the daemon's user, relayed", relayNobody, sock, true},
		{"another user, directly", other, upstream, false},
		{"another user, relayed", other, sock, false},
	} {
		out, err := virshAs(c.uid, c.sock)
		if ok := err == nil && strings.Contains(out, "test   running"); ok != c.ok {
			t.Errorf("%s: served %v, want %v: %v\n%s", c.who, ok, c.ok, err, out)
		}
	}
	// The file's mode no longer stops anyone; the peer check still does.
	if err := os.Chmod(sock, 0o777); err != nil {
		t.Fatal(err)
	}
	// The relay closes the refused connection at once: virsh reports it
	// or, writing its first call, dies of SIGPIPE.
	if out, err := virshAs(other, sock); err == nil || strings.Contains(out, "running") {
		t.Errorf("another user after chmod 0777: %v\n%s", err, out)
	}
	if out, err := virshAs(relayNobody, sock); err != nil {
		t.Errorf("the daemon's user after chmod 0777: %v\n%s", err, out)
	}

	cmd := exec.Command(os.Args[0], "--connect", connect, "--state-dir", t.TempDir(), "--pool", dir,
		"serve", "--socket-ro", filepath.Join(dir, "ro.sock"), "--upstream", upstream)
	cmd.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1")
	if out, err := cmd.CombinedOutput(); err == nil || !strings.Contains(string(out), "upstream read-only socket: stat "+upstream+"-ro: no such file") {
		t.Errorf("--socket-ro in front of a daemon without a read-only socket: %v\n%s", err, out)
	}
}

// BenchmarkRelayList is the latency xlsnap serve adds to a relayed call:
// the stock `virsh list`, the whole client process (median), against a
// session daemon directly ("native") and through the relay ("relay"),
// so make bench prints relay ÷ direct (the goal of issue #16: ≤ 1.1×).
func BenchmarkRelayList(b *testing.B) {
	if _, err := exec.LookPath("virsh"); err != nil {
		b.Skip("virsh is not installed")
	}
	upstream := sessionLibvirtd(b)
	dir, err := os.MkdirTemp("", "xlsnap-relayb-")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { os.RemoveAll(dir) })
	sock := startRelay(b, "test+unix:///default?socket="+upstream, upstream, dir)
	b.Run("native", func(b *testing.B) { benchProcess(b, "virsh", "-c", "test+unix:///default?socket="+upstream, "list") })
	b.Run("relay", func(b *testing.B) { benchProcess(b, "virsh", "-c", "test+unix:///default?socket="+sock, "list") })
}

package libvirt

import (
	"bytes"
	"context"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/xenlight"
)

// nobody is who runs the daemon when the tests run as root: a session
// daemon is an unprivileged user's own.
const nobody = 65534

// sessionDaemon starts a private libvirtd session daemon (QEMU under TCG,
// no root set-up, its own HOME and sockets in a temporary folder) and
// returns a connection to it and a folder its QEMU can write.
func sessionDaemon(t *testing.T) (*Hypervisor, string) {
	t.Helper()
	d := startSession(t)
	h, err := Open(d.URI())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h, d.Images()
}

// session is a libvirtd session daemon a test can kill and start again
// over the same folder, as a host's libvirtd is restarted: the domains it
// runs go on (their QEMU is no child it takes down) and the daemon finds
// them again at its start.
type session struct {
	t         *testing.T
	dir       string
	args, env []string
	log       *lockedBuffer
	cmd       *exec.Cmd
	exited    chan struct{}
}

// startSession starts a session daemon in a new folder; the test's
// cleanup kills it. It skips the test where no session daemon can run.
func startSession(t *testing.T) *session {
	t.Helper()
	if testing.Short() {
		t.Skip("-short: no libvirtd session daemon")
	}
	for _, bin := range []string{"libvirtd", "qemu-system-x86_64", "qemu-img"} {
		if _, err := exec.LookPath(bin); err != nil {
			t.Skipf("%s not installed: no libvirtd session daemon test", bin)
		}
	}
	root := os.Getuid() == 0
	if root {
		if _, err := exec.LookPath("setpriv"); err != nil {
			t.Skip("running as root without setpriv: no unprivileged session daemon")
		}
	}
	dir, err := os.MkdirTemp("", "xlsnap-lvd-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := os.RemoveAll(dir); err != nil {
			t.Error(err)
		}
	})
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{"run", "images"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}

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
	args := []string{"libvirtd", "--timeout=120"} // exits on its own if a test dies
	if root {
		args = append([]string{"setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"}, args...)
	}
	// Where the unprivileged user cannot even run libvirtd (a chroot
	// whose root folder only root may enter, say), there is no session
	// daemon to test.
	probe := exec.Command(args[0], append(slices.Clone(args[1:len(args)-1]), "--version")...)
	probe.Env = env
	if out, err := probe.CombinedOutput(); err != nil {
		t.Skipf("the unprivileged user cannot run libvirtd here: %v: %s", err, out)
	}
	if root {
		chown(t, dir)
	}
	s := &session{t: t, dir: dir, args: args, env: env, log: &lockedBuffer{}}
	t.Cleanup(func() {
		s.Kill()
		if t.Failed() {
			t.Logf("libvirtd log:\n%s", s.log)
		}
	})
	s.Start()
	return s
}

// Socket is the daemon's socket.
func (s *session) Socket() string { return filepath.Join(s.dir, "run", "libvirt", "libvirt-sock") }

// URI is the daemon's connection URI.
func (s *session) URI() string { return "qemu+unix:///session?socket=" + s.Socket() }

// Images is a folder the daemon's QEMU can write.
func (s *session) Images() string { return filepath.Join(s.dir, "images") }

// Start starts the daemon and returns once it takes connections (a
// killed daemon leaves its socket file behind: it is dialled, not
// looked for).
func (s *session) Start() {
	s.t.Helper()
	cmd := exec.Command(s.args[0], s.args[1:]...)
	cmd.Env = s.env
	cmd.Stdout, cmd.Stderr = s.log, s.log
	if err := cmd.Start(); err != nil {
		s.t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	s.cmd, s.exited = cmd, exited
	deadline := time.Now().Add(20 * time.Second)
	for {
		if c, err := net.Dial("unix", s.Socket()); err == nil {
			c.Close()
			return
		}
		select {
		case <-exited:
			s.t.Fatalf("libvirtd exited at its start:\n%s", s.log)
		default:
		}
		if time.Now().After(deadline) {
			s.t.Fatalf("libvirtd took no connection on %s in 20 s:\n%s", s.Socket(), s.log)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Signal sends sig to the daemon (SIGSTOP: a daemon that hangs).
func (s *session) Signal(sig os.Signal) {
	s.t.Helper()
	if err := s.cmd.Process.Signal(sig); err != nil {
		s.t.Fatal(err)
	}
}

// Kill kills the daemon (SIGKILL: no clean-up of its own) and waits for
// it to be gone; a daemon not running is left as it is.
func (s *session) Kill() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.exited
	s.cmd = nil
}

func chown(t *testing.T, dir string) {
	t.Helper()
	err := filepath.Walk(dir, func(p string, _ os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, nobody, nobody)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// qemuDomainXML defines a QEMU domain small enough for a session daemon
// under TCG (64 MiB, one vCPU): name, with uuid, whose one disk, vda, is
// the qcow2 image disk.
func qemuDomainXML(name, uuid, disk string) string {
	return `<domain type='qemu'>
  <name>` + name + `</name>
  <uuid>` + uuid + `</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='` + disk + `'/>
      <target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>`
}

// qemuDomainQMPXML is qemuDomainXML with a second QMP monitor at qmp,
// beside libvirt's own, for xlsnap's live work (see QMPSocketOf).
func qemuDomainQMPXML(name, uuid, disk, qmp string) string {
	doc := strings.Replace(qemuDomainXML(name, uuid, disk), "<domain type='qemu'>",
		"<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>", 1)
	return strings.Replace(doc, "</domain>", `  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:`+qmp+`,server=on,wait=off'/>
  </qemu:commandline>
</domain>`, 1)
}

// TestSessionDaemon runs the save/restore hazard on a real QEMU domain:
// a restore with a repointed disk must leave QEMU writing to the new
// overlay, not to the image the domain was saved with.
func TestSessionDaemon(t *testing.T) {
	h, dir := sessionDaemon(t)
	ctx := context.Background()
	oldDisk, newDisk := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
	for _, args := range [][]string{
		{"create", "-q", "-f", "qcow2", oldDisk, "64M"},
		{"create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", oldDisk, newDisk},
	} {
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
	}
	if os.Getuid() == 0 {
		chown(t, dir)
	}
	// The restore's definition must carry the saved domain's uuid.
	def := qemuDomainXML("sess1", "1f9c5e4a-7b7e-4f59-9a55-0d1f4b6c9e21", oldDisk)
	dom, err := h.Conn().DomainCreateXML(def, 0)
	if err != nil {
		t.Fatal(err)
	}
	dom.Free()
	t.Cleanup(func() { h.Destroy(context.Background(), "sess1") })

	wantState(t, h, "sess1", xenlight.Running)
	if err := h.Pause(ctx, "sess1"); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "sess1", xenlight.Paused)
	if err := h.Resume(ctx, "sess1"); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "sess1", xenlight.Running)

	mem := filepath.Join(dir, "sess1.mem")
	if err := h.SaveMemory(ctx, "sess1", mem, false); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "sess1", xenlight.Shutoff) // transient: gone
	if fi, err := os.Stat(mem); err != nil || fi.Size() == 0 {
		t.Fatalf("memory image: %v", err)
	}

	// Real libvirt takes the definition with the image (dxml).
	if err := h.Restore(ctx, "sess1", mem, strings.ReplaceAll(def, oldDisk, newDisk), true); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "sess1", xenlight.Paused)
	live := xmlOf(t, h, "sess1")
	// QEMU's chain is now [b, a]: the top source is the new overlay.
	if i, j := strings.Index(live, newDisk), strings.Index(live, oldDisk); i < 0 || (j >= 0 && j < i) {
		t.Fatalf("restored domain's disk is not %s on top:\n%s", newDisk, live)
	}
	if err := h.Resume(ctx, "sess1"); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "sess1", xenlight.Running)
	if err := h.Destroy(ctx, "sess1"); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "sess1", xenlight.Shutoff)
}

// lockedBuffer collects a process's output while the test may read it.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

package main

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/davecgh/go-xdr/xdr2"
	libvirt "github.com/digitalocean/go-libvirt"
	"github.com/digitalocean/go-libvirt/socket"

	"github.com/xlsnap/xlsnap/serve"
)

// served is `xlsnap serve` running as a process over a folder with one
// domain, web, whose one disk holds 0x11 in its first 64 KiB.
type served struct {
	t       *testing.T
	dir     string
	rw, ro  string
	proc    *exec.Cmd
	logs    *bytes.Buffer
	stopped bool
}

func startServe(t *testing.T) *served {
	t.Helper()
	for _, tool := range []string{"virsh", "qemu-io", "qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s is not installed (make deps installs it)", tool)
		}
	}
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "web.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "16M")
	serveQemuIO(t, img, "write -P 0x11 0 64k")
	def := fmt.Sprintf(`<domain type='xen'><name>web</name><uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid><memory>262144</memory><vcpu>2</vcpu><os><type>linux</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda'/></disk>
</devices></domain>`, img)
	if err := os.WriteFile(filepath.Join(dir, "web.xml"), []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	s := &served{t: t, dir: dir, rw: filepath.Join(dir, "rw.sock"), ro: filepath.Join(dir, "ro.sock"), logs: &bytes.Buffer{}}
	s.proc = exec.Command(os.Args[0], "--connect", "file://"+dir, "--state-dir", t.TempDir(), "serve", "--socket", s.rw, "--socket-ro", s.ro)
	s.proc.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1")
	s.proc.Stdout, s.proc.Stderr = s.logs, s.logs
	if err := s.proc.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.stop)
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if c, err := net.Dial("unix", s.ro); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("xlsnap serve did not listen:\n%s", s.logs)
		}
	}
	return s
}

func (s *served) stop() {
	if s.stopped {
		return
	}
	s.stopped = true
	s.proc.Process.Signal(syscall.SIGTERM)
	s.proc.Wait()
	if s.t.Failed() {
		s.t.Logf("xlsnap serve:\n%s", s.logs)
	}
}

// virsh runs the stock virsh on a socket and returns stdout, stderr and
// whether it failed.
func (s *served) virsh(sock string, args ...string) (string, string, bool) {
	s.t.Helper()
	cmd := exec.Command("virsh", append([]string{"-c", "xen+unix:///system?socket=" + sock}, args...)...)
	cmd.Env = append(os.Environ(), "LC_ALL=C", "LIBVIRT_DEFAULT_URI=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		s.t.Fatal(err)
	}
	return stdout.String(), stderr.String(), err != nil
}

// ok runs virsh on the read-write socket and wants success.
func (s *served) ok(args ...string) string {
	s.t.Helper()
	out, errs, failed := s.virsh(s.rw, args...)
	if failed {
		s.t.Fatalf("virsh %s: %s%s", strings.Join(args, " "), out, errs)
	}
	return out
}

// activeImage is web's disk as virsh domblklist shows it.
func (s *served) activeImage() string {
	s.t.Helper()
	for _, line := range strings.Split(s.ok("domblklist", "web"), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "xvda" {
			return f[1]
		}
	}
	s.t.Fatal("domblklist shows no xvda")
	return ""
}

// serveQemuIO runs one qemu-io command and fails on its error or a
// pattern that does not verify.
func serveQemuIO(t *testing.T, img, cmd string) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, img).CombinedOutput()
	if err != nil || strings.Contains(string(out), "failed") {
		t.Fatalf("qemu-io %s %q: %v\n%s", img, cmd, err, out)
	}
}

// TestServeVirsh drives `xlsnap serve` with the stock virsh over
// xen+unix:///system?socket=…: take, list, inspect, revert and delete,
// the data read back with qemu-io, and libvirt's error lines.
func TestServeVirsh(t *testing.T) {
	s := startServe(t)
	if out := s.ok("snapshot-create-as", "web", "s1", "--disk-only"); out != "Domain snapshot s1 created\n" {
		t.Fatalf("create s1: %q", out)
	}
	overlay := s.activeImage()
	if overlay == filepath.Join(s.dir, "web.qcow2") {
		t.Fatal("the disk was not moved to an overlay")
	}
	serveQemuIO(t, overlay, "write -P 0x22 0 64k")
	s.ok("snapshot-create-as", "web", "s2", "--disk-only")
	if out := s.ok("snapshot-list", "web", "--tree"); out != "s1\n  |\n  +- s2\n    \n\n" {
		t.Fatalf("tree: %q", out)
	}
	info := s.ok("snapshot-info", "web", "s1")
	for _, want := range []string{"Name:           s1\n", "Domain:         web\n", "Current:        no\n", "Location:       external\n", "Children:       1\n", "Descendants:    1\n", "Metadata:       yes\n"} {
		if !strings.Contains(info, want) {
			t.Errorf("snapshot-info lacks %q:\n%s", want, info)
		}
	}
	if x := s.ok("snapshot-dumpxml", "web", "s2"); !strings.Contains(x, "<parent>\n    <name>s1</name>") {
		t.Errorf("dumpxml s2:\n%s", x)
	}
	if out := s.ok("snapshot-current", "web", "--name"); out != "s2\n" {
		t.Errorf("current: %q", out)
	}
	if out := s.ok("snapshot-revert", "web", "s1"); out != "Domain snapshot s1 reverted\n\n" {
		t.Fatalf("revert: %q", out)
	}
	serveQemuIO(t, s.activeImage(), "read -P 0x11 0 64k")
	if out := s.ok("snapshot-delete", "web", "s2"); out != "Domain snapshot s2 deleted\n\n" {
		t.Fatalf("delete: %q", out)
	}
	if out := s.ok("snapshot-list", "web", "--name"); out != "s1\n\n" {
		t.Fatalf("list after delete: %q", out)
	}
	serveQemuIO(t, s.activeImage(), "read -P 0x11 0 64k")

	_, errs, failed := s.virsh(s.rw, "snapshot-info", "web", "nosuch")
	if !failed || errs != "error: Domain snapshot not found: no domain snapshot with matching name 'nosuch'\n" {
		t.Errorf("missing snapshot: failed %v, %q", failed, errs)
	}
	_, errs, failed = s.virsh(s.rw, "snapshot-list", "nosuch")
	if !failed || errs != "error: failed to get domain 'nosuch'\n" {
		t.Errorf("missing domain: failed %v, %q", failed, errs)
	}
	// The read-only socket reads and refuses changes.
	if out, _, failed := s.virsh(s.ro, "snapshot-list", "web", "--name"); failed || out != "s1\n\n" {
		t.Errorf("read-only list: %q", out)
	}
	_, errs, failed = s.virsh(s.ro, "snapshot-create-as", "web", "s3", "--disk-only")
	if !failed || errs != "error: operation forbidden: read only access prevents virDomainSnapshotCreateXML\n" {
		t.Errorf("read-only create: failed %v, %q", failed, errs)
	}
	if out := s.ok("list", "--all"); !strings.Contains(out, " -    web    shut off") {
		t.Errorf("list --all:\n%s", out)
	}
}

// servePython is libvirt-python (Debian's python3-libvirt, a binding
// over the C library) on the socket.
const servePython = `
import sys, libvirt
conn = libvirt.open(sys.argv[1])
dom = conn.lookupByName("web")
snap = dom.snapshotCreateXML("<domainsnapshot><name>p1</name></domainsnapshot>", libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
dom.snapshotCreateXML("<domainsnapshot><name>p2</name></domainsnapshot>", libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY)
print("names", sorted(s.getName() for s in dom.listAllSnapshots()))
print("parent", dom.snapshotLookupByName("p2").getParent().getName())
print("current", dom.snapshotCurrent().getName(), dom.hasCurrentSnapshot())
dom.revertToSnapshot(snap)
print("after revert", dom.snapshotCurrent().getName())
dom.snapshotLookupByName("p2").delete()
print("children", snap.numChildren())
try:
    dom.snapshotLookupByName("nosuch")
except libvirt.libvirtError as e:
    print("error", e.get_error_code(), e.get_error_domain(), e.get_error_message())
conn.close()
`

// TestServePython takes, lists, reverts and deletes snapshots through
// libvirt-python and checks libvirtError's code.
func TestServePython(t *testing.T) {
	if _, err := os.Stat("/usr/bin/python3"); err != nil {
		t.Skip("no /usr/bin/python3 (make deps installs python3-libvirt)")
	}
	if err := exec.Command("/usr/bin/python3", "-c", "import libvirt").Run(); err != nil {
		t.Skip("python3-libvirt is not installed (make deps installs it)")
	}
	s := startServe(t)
	cmd := exec.Command("/usr/bin/python3", "-c", servePython, "xen+unix:///system?socket="+s.rw)
	// libvirt's default error handler also prints the error on stderr.
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("python: %v\n%s%s", err, out, &stderr)
	}
	want := `names ['p1', 'p2']
parent p1
current p2 1
after revert p1
children 0
error 72 35 Domain snapshot not found: no domain snapshot with matching name 'nosuch'
`
	if string(out) != want {
		t.Fatalf("python printed:\n%s\nwant:\n%s", out, want)
	}
	serveQemuIO(t, s.activeImage(), "read -P 0x11 0 64k")
}

// TestServeConcurrentClients runs several virsh clients at once while one
// is killed in the middle of a call and another hangs up on its own call
// unanswered: the others are served, and the service answers after.
func TestServeConcurrentClients(t *testing.T) {
	s := startServe(t)
	s.ok("snapshot-create-as", "web", "base", "--disk-only")

	// A client that opens, sends a create and hangs up before its reply.
	c, err := net.Dial("unix", s.rw)
	if err != nil {
		t.Fatal(err)
	}
	for i, call := range []struct {
		proc uint32
		args any
	}{
		{1, &libvirt.ConnectOpenArgs{Name: libvirt.OptString{"xen:///system"}}},
		{185, &libvirt.DomainSnapshotCreateXMLArgs{Dom: libvirt.Domain{Name: "web"}, XMLDesc: "<domainsnapshot><name>hangup</name></domainsnapshot>", Flags: 16}},
	} {
		var body bytes.Buffer
		if _, err := xdr.Marshal(&body, call.args); err != nil {
			t.Fatal(err)
		}
		p := serve.Packet{Header: socket.Header{Program: serve.ProgramRemote, Version: serve.ProtocolVersion, Procedure: call.proc, Type: socket.Call, Serial: int32(i)}, Body: body.Bytes()}
		if _, err := c.Write(p.Encode()); err != nil {
			t.Fatal(err)
		}
		if call.proc == 1 {
			// As every client, wait for the connection to be open.
			if r, err := serve.ReadPacket(c); err != nil || r.Status != socket.StatusOK {
				t.Fatalf("open: %+v %v", r, err)
			}
		}
	}
	c.Close()

	victim := exec.Command("virsh", "-c", "xen+unix:///system?socket="+s.rw, "snapshot-create-as", "web", "killed", "--disk-only")
	if err := victim.Start(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan string, 8)
	for i := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var args []string
			if i%2 == 0 {
				args = []string{"snapshot-create-as", "web", fmt.Sprintf("c%d", i), "--disk-only"}
			} else {
				args = []string{"snapshot-list", "web", "--tree"}
			}
			if out, e, failed := s.virsh(s.rw, args...); failed {
				errs <- fmt.Sprintf("virsh %v: %s%s", args, out, e)
			}
		}()
	}
	time.Sleep(30 * time.Millisecond)
	victim.Process.Kill()
	victim.Wait()
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	list := s.ok("snapshot-list", "web", "--name")
	for _, n := range []string{"base", "c0", "c2", "c4"} {
		if !strings.Contains(list, n+"\n") {
			t.Errorf("snapshot %s missing:\n%s", n, list)
		}
	}
	// The hung-up client's create ran to its end (calls run under the
	// service, not their connection); the killed client's either finished
	// whole or never began.
	if !strings.Contains(list, "hangup\n") {
		t.Errorf("the hung-up client's snapshot is missing:\n%s", list)
	}
	s.ok("snapshot-list", "web", "--tree")
	serveQemuIO(t, s.activeImage(), "read -P 0x11 0 64k")
}

// TestServeSecrets: dumpxml and snapshot-dumpxml print a VNC password
// only with --security-info, as libvirt does, and a read-only
// connection asking for it is refused as libvirt refuses it.
func TestServeSecrets(t *testing.T) {
	s := startServe(t)
	img := filepath.Join(s.dir, "vnc.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "16M")
	def := fmt.Sprintf(`<domain type='xen'><name>vnc</name><uuid>5dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid><memory>262144</memory><os><type>linux</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda'/></disk>
<graphics type='vnc' port='-1' passwd='sesame'/>
</devices></domain>`, img)
	if err := os.WriteFile(filepath.Join(s.dir, "vnc.xml"), []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	s.ok("snapshot-create-as", "vnc", "v1", "--disk-only")
	for _, cmd := range [][]string{{"dumpxml", "vnc"}, {"snapshot-dumpxml", "vnc", "v1"}} {
		for _, sock := range []string{s.rw, s.ro} {
			out, errs, failed := s.virsh(sock, cmd...)
			if failed || !strings.Contains(out, "<graphics type='vnc'") || strings.Contains(out, "sesame") {
				t.Errorf("%v on %s: failed %v, %s%s", cmd, filepath.Base(sock), failed, out, errs)
			}
		}
		secure := append(cmd, "--security-info")
		if out := s.ok(secure...); !strings.Contains(out, "sesame") {
			t.Errorf("%v: no password:\n%s", secure, out)
		}
		api := map[string]string{"dumpxml": "virDomainGetXMLDesc", "snapshot-dumpxml": "virDomainSnapshotGetXMLDesc"}[cmd[0]]
		want := "error: operation forbidden: " + api + " with secure flag\n"
		if out, errs, failed := s.virsh(s.ro, secure...); !failed || !strings.HasSuffix(errs, want) || strings.Contains(out, "sesame") {
			t.Errorf("%v on the read-only socket: failed %v, %q %q", secure, failed, out, errs)
		}
	}
}

// TestServeDefineConflicts: virsh define of a document whose UUID another
// domain has, or whose name a domain of another UUID has, is refused with
// libvirt's words and changes nothing; a new domain's file takes the
// mode of the folder's other definitions.
func TestServeDefineConflicts(t *testing.T) {
	s := startServe(t)
	s.ok("snapshot-create-as", "web", "s1", "--disk-only")
	webXML, err := os.ReadFile(filepath.Join(s.dir, "web.xml"))
	if err != nil {
		t.Fatal(err)
	}
	define := func(name, uuid string) (string, bool) {
		doc := filepath.Join(t.TempDir(), name+".xml")
		x := fmt.Sprintf("<domain type='xen'><name>%s</name><uuid>%s</uuid><memory>262144</memory><os><type>linux</type></os></domain>", name, uuid)
		if err := os.WriteFile(doc, []byte(x), 0o644); err != nil {
			t.Fatal(err)
		}
		_, errs, failed := s.virsh(s.rw, "define", doc)
		return errs, failed
	}
	const webUUID = "4dea22b3-1d52-d8f3-2516-782e98ab3fa0"
	for _, tc := range []struct{ name, uuid, want string }{
		{"copy", webUUID, "error: operation failed: domain 'web' is already defined with uuid " + webUUID + "\n"},
		{"web", "6dea22b3-1d52-d8f3-2516-782e98ab3fa0", "error: operation failed: domain 'web' already exists with uuid " + webUUID + "\n"},
	} {
		if errs, failed := define(tc.name, tc.uuid); !failed || !strings.HasSuffix(errs, tc.want) {
			t.Errorf("define %s %s: failed %v, %q", tc.name, tc.uuid, failed, errs)
		}
	}
	if _, err := os.Stat(filepath.Join(s.dir, "copy.xml")); !os.IsNotExist(err) {
		t.Errorf("a refused define left copy.xml: %v", err)
	}
	if b, _ := os.ReadFile(filepath.Join(s.dir, "web.xml")); !bytes.Equal(b, webXML) {
		t.Errorf("a refused define changed web.xml:\n%s", b)
	}
	if out := s.ok("snapshot-list", "web", "--name"); out != "s1\n\n" {
		t.Errorf("web's snapshots after the refused defines: %q", out)
	}
	if errs, failed := define("fresh", "7dea22b3-1d52-d8f3-2516-782e98ab3fa0"); failed {
		t.Fatalf("define fresh: %s", errs)
	}
	if fi, err := os.Stat(filepath.Join(s.dir, "fresh.xml")); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("fresh.xml: %v %v, want the mode of web.xml, 0644", fi.Mode(), err)
	}
	if out := s.ok("list", "--all", "--name"); out != "fresh\nweb\n\n" {
		t.Errorf("list after the defines: %q", out)
	}
}

// TestServeReadOnlySocketForEveryone: over a folder the read-only socket
// is libvirtd's 0777 and another user lists snapshots on it but changes
// nothing; the read-write socket stays the service user's.
func TestServeReadOnlySocketForEveryone(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("running virsh as another user needs root")
	}
	s := startServe(t)
	s.ok("snapshot-create-as", "web", "s1", "--disk-only")
	for sock, want := range map[string]os.FileMode{s.rw: 0o600, s.ro: 0o777} {
		if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != want {
			t.Errorf("%s: %v %v, want %#o", filepath.Base(sock), fi.Mode(), err, want)
		}
	}
	// nobody must reach the sockets' folder (the temporary folders are
	// 0700); the system's temporary folder is left as it is.
	tmp, err := filepath.EvalSymlinks(os.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	for d := s.dir; d != tmp && d != filepath.Dir(d); d = filepath.Dir(d) {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	home := t.TempDir()
	os.Chmod(home, 0o777)
	asNobody := &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	probe := exec.Command("virsh", "--version")
	probe.SysProcAttr = asNobody
	if err := probe.Run(); errors.Is(err, fs.ErrPermission) {
		t.Skipf("uid 65534 cannot run virsh here (%v): a folder on its path is closed to it, as the root of a chroot made with mktemp -d is", err)
	}
	nobody := func(sock string, args ...string) (string, string, bool) {
		cmd := exec.Command("virsh", append([]string{"-c", "xen+unix:///system?socket=" + sock}, args...)...)
		cmd.Env = append(os.Environ(), "LC_ALL=C", "LIBVIRT_DEFAULT_URI=", "HOME="+home, "XDG_CACHE_HOME="+home, "XDG_CONFIG_HOME="+home, "XDG_RUNTIME_DIR="+home)
		cmd.SysProcAttr = asNobody
		var stdout, stderr bytes.Buffer
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		if _, ok := err.(*exec.ExitError); err != nil && !ok {
			t.Fatal(err)
		}
		return stdout.String(), stderr.String(), err != nil
	}
	if out, errs, failed := nobody(s.ro, "snapshot-list", "web", "--name"); failed || out != "s1\n\n" {
		t.Errorf("nobody's list on the read-only socket: %q %q", out, errs)
	}
	if _, errs, failed := nobody(s.ro, "snapshot-delete", "web", "s1"); !failed || !strings.Contains(errs, "operation forbidden: read only access prevents virDomainSnapshotDelete") {
		t.Errorf("nobody's delete on the read-only socket: failed %v, %q", failed, errs)
	}
	if out, errs, failed := nobody(s.rw, "snapshot-list", "web", "--name"); !failed {
		t.Errorf("nobody used the read-write socket: %q %q", out, errs)
	}
	if out := s.ok("snapshot-list", "web", "--name"); out != "s1\n\n" {
		t.Errorf("list after nobody's calls: %q", out)
	}
}

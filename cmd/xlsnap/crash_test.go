package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// TestCrashDefinitionStep kills the command (SIGKILL) at every point an
// operation passes, including its definition step, and then, before any
// xlsnap call, reads the data back through the definition as a
// hypervisor starting the domain would: it must name images that exist
// and hold the domain's current data. The next call then recovers, and
// check must find nothing.
func TestCrashDefinitionStep(t *testing.T) {
	type scenario struct {
		name string
		// op runs on a domain whose xvda holds 0x11 over its first MiB
		// (in vm-xvda.qcow2) and, after s1, 0x22 over topK KiB at 0.
		op   []string
		topK int
		// now lists what the definition may read at 0 and at 512 KiB:
		// the state before the operation or after it.
		now [][2]byte
	}
	for _, sc := range []scenario{
		{"delete-commit-down", []string{"snapshot-delete", "vm", "s1"}, 64, [][2]byte{{0x22, 0x11}}},
		{"delete-pull-up-to-user-name", []string{"snapshot-delete", "vm", "s1"}, 4096, [][2]byte{{0x22, 0x22}}},
		{"revert", []string{"snapshot-revert", "vm", "s1"}, 64, [][2]byte{{0x22, 0x11}, {0x11, 0x11}}},
	} {
		t.Run(sc.name, func(t *testing.T) {
			t.Parallel()
			setup := func() *cli {
				c := newCLI(t)
				qemuIO(t, c.path("vm-xvda.qcow2"), "write -P 0x11 0 1M")
				c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
				qemuIO(t, c.path("vm-xvda.s1"), fmt.Sprintf("write -P 0x22 0 %dk", sc.topK))
				return c
			}
			ref := setup()
			trace := filepath.Join(t.TempDir(), "trace")
			if _, stderr, code := crashRun(t, ref, "XLSNAP_CRASH_TRACE="+trace, sc.op...); code != 0 {
				t.Fatalf("reference run: exit %d: %s", code, stderr)
			}
			b, err := os.ReadFile(trace)
			if err != nil {
				t.Fatal(err)
			}
			points := strings.Fields(string(b))
			if !strings.Contains(string(b), "/definition") {
				t.Fatalf("%v never passed its definition step: %v", sc.op, points)
			}
			for _, p := range points {
				c := setup()
				if _, _, code := crashRun(t, c, "XLSNAP_CRASH_AT="+p, sc.op...); code != -1 {
					t.Fatalf("at %s: exit %d, want death by SIGKILL", p, code)
				}
				// Before any xlsnap call: what a hypervisor would open.
				src := defSource(t, c, "xvda")
				got := [2]byte{readByte(t, src, 0), readByte(t, src, 512<<10)}
				if !containsPair(sc.now, got) {
					t.Fatalf("killed at %s: the definition names %s, which reads %#x/%#x; want one of %#x", p, src, got[0], got[1], sc.now)
				}
				qemuImg(t, "check", "-q", "-f", "qcow2", src)
				// The next call recovers; nothing is left for check.
				if out := c.ok("check"); out != "no problems found\n" {
					t.Fatalf("killed at %s, then check: %s", p, out)
				}
				src = defSource(t, c, "xvda")
				if got := [2]byte{readByte(t, src, 0), readByte(t, src, 512<<10)}; !containsPair(sc.now, got) {
					t.Fatalf("killed at %s, recovered: %s reads %#x/%#x", p, src, got[0], got[1])
				}
			}
			t.Logf("%s: %d kills, each recovered: %v", sc.name, len(points), points)
		})
	}
}

// crashRun runs the command with extra environment; a kill by a signal
// is exit code -1.
func crashRun(t *testing.T, c *cli, env string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], append([]string{"--connect", "file://" + c.dir, "--state-dir", c.state}, args...)...)
	cmd.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1", env)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		if ws := ee.Sys().(syscall.WaitStatus); ws.Signaled() {
			return out.String(), errb.String(), -1
		}
		return out.String(), errb.String(), ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), 0
}

// defSource is the file the definition on disk names for a disk.
func defSource(t *testing.T, c *cli, target string) string {
	t.Helper()
	b, err := os.ReadFile(c.path("vm.xml"))
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(string(b)); err != nil {
		t.Fatalf("vm.xml: %v\n%s", err, b)
	}
	for _, disk := range d.Devices.Disks {
		if disk.Target != nil && disk.Target.Dev == target {
			return disk.Source.File.File
		}
	}
	t.Fatalf("vm.xml has no %s", target)
	return ""
}

// readByte reads the pattern a 64 KiB region of an image holds (through
// its chain, with qemu-io): the first byte, then the whole region checked
// against it.
func readByte(t *testing.T, path string, off int) byte {
	t.Helper()
	out, err := exec.Command("qemu-io", "-r", "-f", "qcow2", "-c", fmt.Sprintf("read -v %d 1", off), path).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-io %s: %v\n%s", path, err, out)
	}
	_, rest, ok := strings.Cut(string(out), ":  ")
	if !ok || len(rest) < 2 {
		t.Fatalf("qemu-io read -v: %s", out)
	}
	b, err := strconv.ParseUint(rest[:2], 16, 8)
	if err != nil {
		t.Fatalf("qemu-io read -v: %s", out)
	}
	out, err = exec.Command("qemu-io", "-r", "-f", "qcow2", "-c", fmt.Sprintf("read -P 0x%02x %d 64k", b, off), path).CombinedOutput()
	if err != nil || strings.Contains(string(out), "verification failed") {
		t.Fatalf("%s at %d is not one pattern: %v\n%s", path, off, err, out)
	}
	return byte(b)
}

func qemuIO(t *testing.T, path, cmd string) {
	t.Helper()
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-io %s: %v\n%s", cmd, err, out)
	}
}

func containsPair(set [][2]byte, p [2]byte) bool {
	for _, s := range set {
		if s == p {
			return true
		}
	}
	return false
}

// TestPendingNeverWedges: a delete killed half-way whose recovery cannot
// run (the image it commits into was moved away) leaves an intent. Reads
// still answer and say so, the domain's operations are refused with the
// cause, and check --repair sets the intent aside (a report, nothing
// removed), after which the domain is usable again.
func TestPendingNeverWedges(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.seedS1()
	c.killAt("delete/step1-commit", "snapshot-delete", "vm", "s1")
	if err := os.Rename(c.path("vm-xvda.qcow2"), c.path("away")); err != nil {
		t.Fatal(err)
	}
	if out, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "snapshot-list", "vm", "--name"); code != 0 ||
		strings.TrimSpace(out) != "s1" || !strings.Contains(stderr, "note: delete ") {
		t.Fatalf("snapshot-list while pending: exit %d, %q, %q", code, out, stderr)
	}
	stdout, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "domblklist", "vm")
	if code != 0 || !strings.Contains(stdout, "vm-xvda.s1") || !strings.Contains(stderr, "pending") {
		t.Fatalf("domblklist while pending: exit %d\n%s\n%s", code, stdout, stderr)
	}
	c.fails("pending", "snapshot-create-as", "vm", "s2", "--disk-only")
	if stdout, _, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "check"); code == 0 || !strings.Contains(stdout, "pending-operation vm ") {
		t.Fatalf("check while pending: exit %d\n%s", code, stdout)
	}
	before := c.files()
	// The image is still away: repair reports that too, and exits 1.
	out, _, _ := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "check", "--repair")
	if !strings.Contains(out, "set aside in "+filepath.Join(c.state, "set-aside")) {
		t.Fatalf("check --repair: %s", out)
	}
	if after := c.files(); !slicesEqual(before, after) {
		t.Fatalf("repair changed the folder: %v -> %v", before, after)
	}
	if err := os.Rename(c.path("away"), c.path("vm-xvda.qcow2")); err != nil {
		t.Fatal(err)
	}
	// Past its point of no return, the delete may have merged s1's
	// images: s1 stays listed, marked; a revert to it is refused; the
	// set-aside report stays in check until a person removes it.
	c.fails("may have merged", "snapshot-revert", "vm", "s1")
	out, _, _ = runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "check", "--repair")
	if !strings.Contains(out, "set-aside ") || !strings.Contains(out, "damaged-snapshot vm ") {
		t.Fatalf("check --repair after the set-aside: %s", out)
	}
	c.ok("snapshot-delete", "vm", "s1", "--metadata")
	reports, _ := filepath.Glob(filepath.Join(c.state, "set-aside", "*.json"))
	if len(reports) != 1 {
		t.Fatalf("set-aside reports: %v", reports)
	}
	report, err := os.ReadFile(reports[0])
	if err != nil || !strings.Contains(string(report), c.path("vm-xvda.qcow2")) {
		t.Fatalf("the report does not name the commit's target: %v\n%s", err, report)
	}
	if err := os.Remove(reports[0]); err != nil {
		t.Fatal(err)
	}
	// Only that s1's state image, which nothing needs now, could be
	// merged away (informational: coalesce would).
	want := fmt.Sprintf("coalescible vm xvda %s: the chain could be 1 layer shorter: nothing needs %s [xlsnap coalesce vm merges them]\nno problems found\n",
		c.path("vm-xvda.s1"), c.path("vm-xvda.qcow2"))
	if out := c.ok("check"); out != want {
		t.Fatalf("check: %s", out)
	}
	src := defSource(t, c, "xvda")
	if got := [2]byte{readByte(t, src, 0), readByte(t, src, 512<<10)}; got != [2]byte{0x22, 0x11} {
		t.Fatalf("%s reads %#x", src, got)
	}
}

// files lists the folder's names.
func (c *cli) files() []string { return storagetest.Files(c.t, c.dir) }

func slicesEqual(a, b []string) bool { return strings.Join(a, "\x00") == strings.Join(b, "\x00") }

// TestCrashHalfMadeOverlay: killed after qemu-img made the overlay but
// before it had its name, the snapshot leaves only a temporary file;
// the next command undoes it, and the same name can be taken again.
func TestCrashHalfMadeOverlay(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.killAt("snapshot/step0-create-overlay/overlay-made", "snapshot-create-as", "vm", "s1", "--disk-only")
	if _, err := os.Stat(c.path("vm-xvda.s1")); !os.IsNotExist(err) {
		t.Fatalf("a half-made overlay has the overlay's name: %v", err)
	}
	if _, err := os.Stat(c.path(".vm-xvda.s1.xlsnap-tmp")); err != nil {
		t.Fatalf("no temporary file: %v", err)
	}
	c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	if got := c.files(); !slicesEqual(got, []string{"vm-xvda.qcow2", "vm-xvda.s1", "vm-xvdb.qcow2", "vm-xvdb.s1", "vm.xml"}) {
		t.Fatalf("folder after the retry: %v", got)
	}
	if out := c.ok("check"); out != "no problems found\n" {
		t.Fatalf("check: %s", out)
	}
}

// TestCrashCommitSourceMovedAway: a delete killed while committing the
// top into its base; before the next call the top is moved away. The
// missing top is never taken for "committed already" (its data is not
// in the base): recovery waits, and finishes right once it is back.
func TestCrashCommitSourceMovedAway(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.seedS1()
	c.killAt("delete/step1-commit", "snapshot-delete", "vm", "s1")
	if err := os.Rename(c.path("vm-xvda.s1"), c.path("away")); err != nil {
		t.Fatal(err)
	}
	if out := c.ok("snapshot-list", "vm", "--name"); strings.TrimSpace(out) != "s1" {
		t.Fatalf("snapshot-list: %q", out)
	}
	if stdout, _, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "check"); code == 0 || !strings.Contains(stdout, "pending-operation vm ") {
		t.Fatalf("check with the top gone: exit %d\n%s", code, stdout)
	}
	if got := readByte(t, c.path("vm-xvda.qcow2"), 512<<10); got != 0x11 {
		t.Fatalf("the base reads %#x at 512k", got)
	}
	if err := os.Rename(c.path("away"), c.path("vm-xvda.s1")); err != nil {
		t.Fatal(err)
	}
	if out := c.ok("check"); out != "no problems found\n" {
		t.Fatalf("check once the top is back: %s", out)
	}
	src := defSource(t, c, "xvda")
	if got := [2]byte{readByte(t, src, 0), readByte(t, src, 512<<10)}; got != [2]byte{0x22, 0x11} {
		t.Fatalf("%s reads %#x", src, got)
	}
}

// TestStaleTemporaryFiles: what a crash leaves under temporary names (a
// definition half-written, a new image, a new store) is reported by check
// once nothing could still be writing it, and removed by check --repair.
func TestStaleTemporaryFiles(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	old := time.Now().Add(-20 * time.Minute)
	fresh := c.path(".vm.xml.222")
	var stale []string
	for _, p := range []string{c.path(".vm.xml.111"), c.path(".vm-xvda.s2.xlsnap-tmp"), filepath.Join(c.state, "xlsnap.db.new-999"), fresh} {
		if err := os.WriteFile(p, []byte("half"), 0o600); err != nil {
			t.Fatal(err)
		}
		if p != fresh {
			if err := os.Chtimes(p, old, old); err != nil {
				t.Fatal(err)
			}
			stale = append(stale, p)
		}
	}
	stdout, _, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "check")
	if code == 0 || strings.Count(stdout, "temp-file") != 3 || strings.Contains(stdout, fresh) {
		t.Fatalf("check: exit %d\n%s", code, stdout)
	}
	out := c.ok("check", "--repair")
	if strings.Count(out, "[fixed]") != 3 {
		t.Fatalf("check --repair: %s", out)
	}
	for _, p := range stale {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Fatalf("%s is still there: %v", p, err)
		}
	}
	if _, err := os.Stat(fresh); err != nil {
		t.Fatalf("a fresh temporary file (maybe a running operation's) was removed: %v", err)
	}
	if out := c.ok("check"); out != "no problems found\n" {
		t.Fatalf("check: %s", out)
	}
}

// TestStaleBackup: when the store's copy cannot be refreshed, the
// operation that committed still succeeds; check says the copy is stale
// until a copy is made again (check --repair makes one).
func TestStaleBackup(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	backup := filepath.Join(c.state, "xlsnap.db.backup")
	if err := os.Remove(backup); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(backup, 0o700); err != nil { // the copy cannot be renamed into place
		t.Fatal(err)
	}
	c.ok("snapshot-create-as", "vm", "s2", "--disk-only")
	stdout, _, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "check")
	if code == 0 || !strings.Contains(stdout, "stale-backup") {
		t.Fatalf("check with a stale copy: exit %d\n%s", code, stdout)
	}
	if err := os.Remove(backup); err != nil {
		t.Fatal(err)
	}
	if out := c.ok("check", "--repair"); !strings.Contains(out, "stale-backup") || !strings.Contains(out, "[fixed]") {
		t.Fatalf("check --repair: %s", out)
	}
	if out := c.ok("check"); out != "no problems found\n" {
		t.Fatalf("check: %s", out)
	}
}

// TestCrashThenRename: a revert killed once its metadata committed,
// then the domain renamed (same UUID) before the next call: the pending
// definition step finds the domain by its UUID and rewrites it under
// its new name.
func TestCrashThenRename(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	b, err := os.ReadFile(c.path("vm.xml"))
	if err != nil {
		t.Fatal(err)
	}
	withUUID := strings.Replace(string(b), "<name>vm</name>", "<name>vm</name><uuid>5b2a1c1e-0000-4000-8000-00000000ab01</uuid>", 1)
	if err := os.WriteFile(c.path("vm.xml"), []byte(withUUID), 0o644); err != nil {
		t.Fatal(err)
	}
	c.seedS1()
	c.killAt("revert/committed", "snapshot-revert", "vm", "s1")
	b, err = os.ReadFile(c.path("vm.xml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.path("web3.xml"), []byte(strings.Replace(string(b), "<name>vm</name>", "<name>web3</name>", 1)), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(c.path("vm.xml")); err != nil {
		t.Fatal(err)
	}
	c.ok("snapshot-list", "web3")
	if out := c.ok("check"); out != "no problems found\n" {
		t.Fatalf("check: %s", out)
	}
	b, err = os.ReadFile(c.path("web3.xml"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), c.path("vm-xvda.s1-1")) || !strings.Contains(string(b), "<name>web3</name>") {
		t.Fatalf("web3.xml after recovery:\n%s", b)
	}
	src := c.path("vm-xvda.s1-1")
	if got := readByte(t, src, 0); got != 0x11 {
		t.Fatalf("the reverted disk reads %#x", got)
	}
}

// seedS1 writes 0x11 over xvda's first MiB, takes s1 (disk-only) and
// writes 0x22 over the first 64 KiB of the new top.
func (c *cli) seedS1() {
	c.t.Helper()
	qemuIO(c.t, c.path("vm-xvda.qcow2"), "write -P 0x11 0 1M")
	c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	qemuIO(c.t, c.path("vm-xvda.s1"), "write -P 0x22 0 64k")
}

// killAt runs a command that must die by SIGKILL at a crash point.
func (c *cli) killAt(point string, args ...string) {
	c.t.Helper()
	if _, _, code := crashRun(c.t, c, "XLSNAP_CRASH_AT="+point, args...); code != -1 {
		c.t.Fatalf("%v was not killed at %s: exit %d", args, point, code)
	}
}

// TestCheckUserClone: an overlay of a recorded image that nothing names
// (a user's clone, not yet defined) is listed by check, as a note: xlsnap
// leaves no such files itself.
func TestCheckUserClone(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", c.path("vm-xvda.qcow2"), c.path("clone.qcow2"))
	out := c.ok("check")
	if !strings.Contains(out, "orphan-image") || !strings.Contains(out, c.path("clone.qcow2")) || !strings.HasSuffix(out, "no problems found\n") {
		t.Fatalf("check: %s", out)
	}
}

// TestCrashLeaksFreed: a qemu-img killed mid-step leaves leaked clusters
// (qemu-img check exit 3, no harm to data); the recovery that follows
// frees them in the images the interrupted steps write, so check finds
// nothing afterwards and the data stays.
func TestCrashLeaksFreed(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.seedS1()
	c.killAt("delete/step1-commit", "snapshot-delete", "vm", "s1")
	base := c.path("vm-xvda.qcow2")
	leakCluster(t, base)
	if err := exec.Command("qemu-img", "check", "-q", "-f", "qcow2", base).Run(); exitCode(err) != 3 {
		t.Fatalf("qemu-img check of the leaked base: %v, want exit 3", err)
	}
	if out, _, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "check"); code != 0 {
		t.Fatalf("check after the crash: exit %d\n%s", code, out)
	}
	if out, err := exec.Command("qemu-img", "check", "-f", "qcow2", base).CombinedOutput(); err != nil {
		t.Fatalf("the leak is still there: %v\n%s", err, out)
	}
	src := defSource(t, c, "xvda")
	if got := [2]byte{readByte(t, src, 0), readByte(t, src, 512<<10)}; got != [2]byte{0x22, 0x11} {
		t.Fatalf("%s reads %#x", src, got)
	}
}

// leakCluster gives a qcow2 image one leaked cluster, as a killed
// qemu-img leaves one: a cluster past the end of the file, counted once
// in the first refcount block and referenced by no table.
func leakCluster(t *testing.T, path string) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := make([]byte, 104)
	if _, err := f.ReadAt(h, 0); err != nil {
		t.Fatal(err)
	}
	clusterSize := int64(1) << binary.BigEndian.Uint32(h[20:])
	if order := binary.BigEndian.Uint32(h[96:]); order != 4 {
		t.Fatalf("refcount order %d: the test writes 16-bit refcounts", order)
	}
	entry := make([]byte, 8)
	if _, err := f.ReadAt(entry, int64(binary.BigEndian.Uint64(h[48:]))); err != nil {
		t.Fatal(err)
	}
	block := int64(binary.BigEndian.Uint64(entry))
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	n := (fi.Size() + clusterSize - 1) / clusterSize
	if 2*n >= clusterSize {
		t.Fatalf("cluster %d is past the first refcount block", n)
	}
	if _, err := f.WriteAt([]byte{0, 1}, block+2*n); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate((n + 1) * clusterSize); err != nil {
		t.Fatal(err)
	}
}

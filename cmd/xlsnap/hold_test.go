package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore/etcdtest"
)

// background starts xlsnap with args as a process of its own; the
// returned channel gets its exit code, stdout and stderr once it ends.
type bgResult struct {
	code           int
	stdout, stderr string
}

func background(t *testing.T, args ...string) <-chan bgResult {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan bgResult, 1)
	go func() {
		err := cmd.Wait()
		code := 0
		if ee, ok := err.(*exec.ExitError); ok {
			code = ee.ExitCode()
		}
		done <- bgResult{code, out.String(), errb.String()}
	}()
	t.Cleanup(func() { cmd.Process.Kill() })
	return done
}

// stillWaiting fails if the process has ended within a short while.
func stillWaiting(t *testing.T, done <-chan bgResult, what string) {
	t.Helper()
	select {
	case r := <-done:
		t.Fatalf("%s ran during the hold: exit %d\n%s%s", what, r.code, r.stdout, r.stderr)
	case <-time.After(500 * time.Millisecond):
	}
}

// finished waits for the process, which must succeed.
func finished(t *testing.T, done <-chan bgResult, what string) string {
	t.Helper()
	select {
	case r := <-done:
		if r.code != 0 {
			t.Fatalf("%s: exit %d\n%s", what, r.code, r.stderr)
		}
		return r.stdout
	case <-time.After(60 * time.Second):
		t.Fatalf("%s still waits after the rescan", what)
	}
	return ""
}

// errorCode is libvirt's code of the --json error object on stderr.
func errorCode(t *testing.T, stderr string) int {
	t.Helper()
	var e struct{ Error struct{ Code int } }
	if err := json.Unmarshal([]byte(stderr), &e); err != nil {
		t.Fatalf("not an error object: %v\n%s", err, stderr)
	}
	return e.Error.Code
}

var heldLine = regexp.MustCompile(`^Chain of disk xvda of domain vm held until (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ) \(hold ([0-9a-f]{16})\); run 'xlsnap rescan vm xvda --moved (\S+)=(\S+)' when the edit is done$`)

// TestChainChangingCLI: the two-phase hook from the command line, each
// phase its own process. chain-changing refuses a merge of the active
// layer (55) and an image not in the chain (8), changing nothing; then it
// holds the domain for a copy of the base and exits. Reads go on; a
// snapshot-create-as in another process waits; a second chain-changing
// is refused with 68. The toolstack copies the base and repoints the
// overlay; rescan --moved ends the hold, the waiting snapshot is taken on
// the moved base, the old base goes, and the data reads back.
func TestChainChangingCLI(t *testing.T) {
	c := newCLI(t)
	base, top := c.path("vm-xvda.qcow2"), c.path("vm-xvda.s1")
	qemuIO(t, base, "write -P 0x11 0 1M")
	c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	qemuIO(t, top, "write -P 0x12 1M 1M")
	files := func() string {
		out, _ := exec.Command("sh", "-c", "cd "+c.dir+" && ls -l --time-style=+%s.%N && sha256sum *").CombinedOutput()
		return string(out)
	}
	before := files()
	c.fails("blockcommit --active", "chain-changing", "vm", "xvda", "--committing", top)
	c.fails("is no image of the chain", "chain-changing", "vm", "xvda", "--rewriting", c.path("vm-xvdb.qcow2"))
	c.fails("timeout must be positive", "chain-changing", "vm", "xvda", "--rewriting", base, "--timeout", "0")
	args := []string{"--connect", "file://" + c.dir, "--state-dir", c.state, "--json"}
	_, stderr, code := runXlsnap(t, append(args, "chain-changing", "vm", "xvda", "--committing", top)...)
	if code != 1 || errorCode(t, stderr) != 55 {
		t.Fatalf("refused commit with --json: exit %d, %s", code, stderr)
	}
	_, stderr, _ = runXlsnap(t, append(args, "chain-changing", "vm", "xvda", "--pulling", c.path("nothing.qcow2"))...)
	if errorCode(t, stderr) != 8 {
		t.Fatalf("an image not in the chain, --json: %s", stderr)
	}
	if after := files(); after != before {
		t.Fatalf("refusals changed the folder:\n%s\n%s", before, after)
	}

	if err := os.Mkdir(c.path("moved"), 0o755); err != nil {
		t.Fatal(err)
	}
	newBase := c.path("moved/vm-xvda.qcow2")
	start := time.Now()
	out := c.ok("chain-changing", "vm", "xvda", "--moving", base+"="+newBase, "--timeout", "120")
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) != 2 || lines[0] != "Checked: move "+base+" to "+newBase+": a backing layer; make "+top+" name it (qemu-img rebase -u), then rescan --moved follows it in the records and every snapshot" {
		t.Fatalf("chain-changing printed %q", out)
	}
	m := heldLine.FindStringSubmatch(lines[1])
	if m == nil || m[3] != base || m[4] != newBase {
		t.Fatalf("chain-changing's last line %q", lines[1])
	}
	until, _ := time.Parse(time.RFC3339, m[1])
	if d := until.Sub(start); d < 118*time.Second || d > 122*time.Second {
		t.Fatalf("held until %s, %v after the call; want 120 s", m[1], d)
	}

	// Reads go on.
	if out := c.ok("snapshot-list", "vm", "--name"); strings.TrimSpace(out) != "s1" {
		t.Fatalf("snapshot-list during the hold: %q", out)
	}
	c.ok("snapshot-info", "vm", "s1")
	c.ok("snapshot-dumpxml", "vm", "s1")
	c.ok("check")
	stdout, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "domblklist", "vm")
	if code != 0 || !strings.Contains(stdout, top) || !strings.Contains(stderr, "note: the chain of disk xvda is held for an outside edit (chain-changing, hold "+m[2]) {
		t.Fatalf("domblklist during the hold: exit %d\n%s%s", code, stdout, stderr)
	}
	// A writer waits; a second announcement is refused.
	waiting := background(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "snapshot-create-as", "vm", "s2", "--disk-only")
	stillWaiting(t, waiting, "snapshot-create-as")
	_, stderr, code = runXlsnap(t, append(args, "chain-changing", "vm", "xvdb", "--rewriting", c.path("vm-xvdb.qcow2"))...)
	if code != 1 || errorCode(t, stderr) != 68 || !strings.Contains(stderr, "cannot acquire state change lock (held by chain-changing of disk xvda of domain vm: hold "+m[2]) {
		t.Fatalf("a second chain-changing: exit %d, %s", code, stderr)
	}
	stillWaiting(t, waiting, "snapshot-create-as")

	// The edit, then the second phase.
	if out, err := exec.Command("cp", base, newBase).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	qemuImg(t, "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", newBase, top)
	if out := c.ok("rescan", "vm", "xvda", "--moved", base+"="+newBase); out != "Domain vm disk xvda rescanned\n" {
		t.Fatalf("rescan: %q", out)
	}
	if out := finished(t, waiting, "snapshot-create-as"); out != "Domain snapshot s2 created\n" {
		t.Fatalf("the waiting snapshot printed %q", out)
	}
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	s2 := c.path("vm-xvda.s2")
	if got := c.active("xvda").Chain; !slices.Equal(got, []string{s2, top, newBase}) {
		t.Fatalf("chain after the move and s2: %v", got)
	}
	expectPattern(t, s2, 0x11, 0, 1<<20)
	expectPattern(t, s2, 0x12, 1<<20, 1<<20)
	if out := c.ok("check"); out != "no problems found\n" {
		t.Fatalf("check: %s", out)
	}

	// --json, and the hold of a plan that merges nothing the chain
	// needs: a rewrite of the base's header.
	var h holdJSON
	strict(t, "chain-changing --json", c.ok("--json", "chain-changing", "vm", "xvda", "--rewriting", newBase, "--timeout", "5"), &h)
	if h.Domain != "vm" || h.Disk != "xvda" || len(h.ID) != 16 || !slices.Equal(h.Chain, []string{s2, top, newBase}) ||
		len(h.Checked) != 1 || !strings.HasPrefix(h.Checked[0], "rewrite the header of "+newBase) || !strings.HasSuffix(h.Until, "Z") {
		t.Fatalf("chain-changing --json: %+v", h)
	}
	c.ok("rescan", "vm", "xvda")
	c.ok("snapshot-delete", "vm", "s2")
}

// TestChainChangingCluster: the hold spans hosts. Two hosts share one
// folder of definitions and one etcd store; host A announces a copy of
// the base and its own snapshot-create-as then waits; host B's
// chain-changing is refused with 68 naming host A; host B runs the
// rescan, which ends the hold, and A's waiting snapshot is taken on the
// moved base.
func TestChainChangingCluster(t *testing.T) {
	ec := etcdtest.Start(t, 1)
	etcd := "etcd://" + strings.Join(trimScheme(ec.Endpoints), ",") + "/holdtest"
	c := newDomainFolder(t, "vm", "vm-xvda.qcow2")
	mk := func(name string) *clusterHost {
		return &clusterHost{t: t, name: name, dir: c.dir, state: t.TempDir(), etcd: etcd}
	}
	a, b := mk("hostA"), mk("hostB")
	base := c.path("vm-xvda.qcow2")
	qemuIO(t, base, "write -P 0x31 0 1M")
	a.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	top := c.path("vm-xvda.s1")
	if err := os.Mkdir(c.path("moved"), 0o755); err != nil {
		t.Fatal(err)
	}
	newBase := c.path("moved/vm-xvda.qcow2")
	out := a.ok("chain-changing", "vm", "xvda", "--moving", base+"="+newBase)
	m := heldLine.FindStringSubmatch(strings.Split(strings.TrimSpace(out), "\n")[1])
	if m == nil {
		t.Fatalf("host A's chain-changing: %q", out)
	}
	waiting := background(t, a.args("snapshot-create-as", "vm", "s2", "--disk-only")...)
	stillWaiting(t, waiting, "host A's snapshot-create-as")
	_, stderr, code := b.run("", "--json", "chain-changing", "vm", "xvda", "--rewriting", base)
	if code != 1 || errorCode(t, stderr) != 68 || !strings.Contains(stderr, "hold "+m[2]+" from host hostA") {
		t.Fatalf("host B's chain-changing during A's hold: exit %d %s", code, stderr)
	}
	if out := b.ok("snapshot-list", "vm", "--name"); strings.TrimSpace(out) != "s1" {
		t.Fatalf("host B's snapshot-list during the hold: %q", out)
	}
	if out, err := exec.Command("cp", base, newBase).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	qemuImg(t, "rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b", newBase, top)
	b.ok("rescan", "vm", "xvda", "--moved", base+"="+newBase)
	finished(t, waiting, "host A's snapshot-create-as")
	if err := os.Remove(base); err != nil {
		t.Fatal(err)
	}
	var disks []blk
	if err := json.Unmarshal([]byte(a.ok("--json", "domblklist", "vm")), &disks); err != nil {
		t.Fatal(err)
	}
	if want := []string{c.path("vm-xvda.s2"), top, newBase}; len(disks) != 1 || !slices.Equal(disks[0].Chain, want) {
		t.Fatalf("host A's chain: %+v, want %v", disks, want)
	}
	expectPattern(t, c.path("vm-xvda.s2"), 0x31, 0, 1<<20)
}

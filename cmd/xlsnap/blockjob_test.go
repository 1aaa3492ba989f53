package main

import (
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// bjSeed gives vm's xvda the chain vm-xvda.qcow2 (0x11 over its first
// MiB) <- vm-xvda.a (0x22 over 64 KiB at 512 KiB) <- vm-xvda.b (0x33
// over 64 KiB at 0), layers taken with --no-metadata as libvirt's users
// grow chains before a blockcommit (xvdb gets its own a and b). The disk reads 0x33 at 0 and 0x22 at
// 512 KiB, whatever commit or pull follows.
func (c *cli) bjSeed() {
	c.t.Helper()
	qemuIO(c.t, c.path("vm-xvda.qcow2"), "write -P 0x11 0 1M")
	c.ok("snapshot-create-as", "vm", "a", "--disk-only", "--no-metadata")
	qemuIO(c.t, c.path("vm-xvda.a"), "write -P 0x22 512k 64k")
	c.ok("snapshot-create-as", "vm", "b", "--disk-only", "--no-metadata")
	qemuIO(c.t, c.path("vm-xvda.b"), "write -P 0x33 0 64k")
}

// bjReads asserts what the definition's xvda reads.
func (c *cli) bjReads() {
	c.t.Helper()
	src := defSource(c.t, c, "xvda")
	if got := [2]byte{readByte(c.t, src, 0), readByte(c.t, src, 512<<10)}; got != [2]byte{0x33, 0x22} {
		c.t.Fatalf("%s reads %#x at 0 and 512 KiB, want 0x33 0x22", src, got)
	}
}

// bjChain asserts xvda's chain, as domblklist records it and as qemu-img
// reads it from the definition's image, by file names.
func (c *cli) bjChain(want ...string) {
	c.t.Helper()
	var got []string
	for _, p := range c.active("xvda").Chain {
		got = append(got, filepath.Base(p))
	}
	if !slices.Equal(got, want) {
		c.t.Fatalf("recorded chain %v, want %v", got, want)
	}
	out, err := exec.Command("qemu-img", "info", "-U", "--backing-chain", "--output=json", "-f", "qcow2", defSource(c.t, c, "xvda")).Output()
	if err != nil {
		c.t.Fatal(err)
	}
	var infos []struct{ Filename string }
	if err := json.Unmarshal(out, &infos); err != nil {
		c.t.Fatal(err)
	}
	got = nil
	for _, i := range infos {
		got = append(got, filepath.Base(i.Filename))
		qemuImg(c.t, "check", "-q", "-U", "-f", "qcow2", i.Filename)
	}
	if !slices.Equal(got, want) {
		c.t.Fatalf("qemu-img reads the chain %v, want %v", got, want)
	}
}

func TestBlockCommitCommand(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.bjSeed()
	// A commit of a middle layer, waited for, with virsh's progress.
	stdout, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state,
		"blockcommit", "vm", "xvda", "--top", c.path("vm-xvda.a"), "--wait", "--verbose")
	if code != 0 || stdout != "\nCommit complete\n" || !strings.HasPrefix(stderr, "\rBlock commit: [") || !strings.HasSuffix(stderr, "\rBlock commit: [100 %]") {
		t.Fatalf("blockcommit --wait --verbose: exit %d, stdout %q, stderr %q", code, stdout, stderr)
	}
	c.bjChain("vm-xvda.b", "vm-xvda.qcow2")
	c.bjReads()
	if _, err := os.Stat(c.path("vm-xvda.a")); !os.IsNotExist(err) {
		t.Fatalf("vm-xvda.a, which xlsnap made and nothing uses, is still there: %v", err)
	}
	// The active layer needs --pivot: libvirt's synchronized phase is a
	// job xlsnap cannot keep.
	c.fails("--active without --pivot", "blockcommit", "vm", "xvda", "--active")
	c.fails("commit of 'xvda' active layer requires active flag", "blockcommit", "vm", "xvda")
	c.fails("--keep-overlay", "blockcommit", "vm", "xvda", "--keep-overlay")
	c.fails("unsupported flags (0x2) in function virDomainBlockCommit", "blockcommit", "vm", "xvda", "--pivot", "--delete")
	c.bjChain("vm-xvda.b", "vm-xvda.qcow2")
	// The pivot: the definition names the base.
	if out := c.ok("blockcommit", "vm", c.path("vm-xvda.b"), "--pivot"); out != "\nSuccessfully pivoted\n" {
		t.Fatalf("blockcommit --pivot: %q", out)
	}
	if src := defSource(t, c, "xvda"); src != c.path("vm-xvda.qcow2") {
		t.Fatalf("the definition names %s after the pivot", src)
	}
	c.bjChain("vm-xvda.qcow2")
	c.bjReads()
	if out := c.ok("check"); !onlyCoalescible(out) {
		t.Fatalf("check: %s", out)
	}
	if got := c.files(); !slices.Equal(got, []string{"vm-xvda.qcow2", "vm-xvdb.a", "vm-xvdb.b", "vm-xvdb.qcow2", "vm.xml"}) {
		t.Fatalf("folder %v", got)
	}
}

func TestBlockCommitCommandJSON(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.bjSeed()
	// Without --wait virsh's line for a started job (xlsnap's is done).
	if out := c.ok("blockcommit", "vm", "xvda", "--top", c.path("vm-xvda.a"), "--shallow"); out != "Block Commit started\n" {
		t.Fatalf("blockcommit: %q", out)
	}
	var r blockJobJSON
	c.json(&r, "blockcommit", "vm", "xvda", "--pivot")
	want := blockJobJSON{Domain: "vm", Disk: "xvda", Top: c.path("vm-xvda.b"), Base: c.path("vm-xvda.qcow2"), Active: c.path("vm-xvda.qcow2"),
		Chain: []string{c.path("vm-xvda.qcow2")}, Removed: []string{c.path("vm-xvda.b")}, Kept: []string{}, Pivoted: true}
	if fmt.Sprint(r) != fmt.Sprint(want) {
		t.Fatalf("--json: %+v, want %+v", r, want)
	}
	c.bjReads()
}

func TestBlockPullCommand(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.bjSeed()
	if out := c.ok("blockpull", "vm", "xvda", "--base", c.path("vm-xvda.qcow2"), "--wait"); out != "\nPull complete\n" {
		t.Fatalf("blockpull --base --wait: %q", out)
	}
	c.bjChain("vm-xvda.b", "vm-xvda.qcow2")
	c.bjReads()
	if out := c.ok("blockpull", "vm", "xvda"); out != "Block Pull started\n" {
		t.Fatalf("blockpull: %q", out)
	}
	c.bjChain("vm-xvda.b")
	c.bjReads()
	// vm-xvda.qcow2 is the user's (the definition named it): kept.
	if got := c.files(); !slices.Equal(got, []string{"vm-xvda.b", "vm-xvda.qcow2", "vm-xvdb.a", "vm-xvdb.b", "vm-xvdb.qcow2", "vm.xml"}) {
		t.Fatalf("folder %v", got)
	}
	if out := c.ok("check"); !onlyCoalescible(out) {
		t.Fatalf("check: %s", out)
	}
}

// TestBlockCommitRefusedCommand: a commit into a snapshot's state image
// fails with libvirt's operation-invalid and changes no file.
func TestBlockCommitRefusedCommand(t *testing.T) {
	t.Parallel()
	c := newCLI(t)
	c.seedS1()
	before := c.fileBytes()
	c.fails("Requested operation is not valid: blockcommit of disk xvda would change data that others read: "+c.path("vm-xvda.qcow2")+": a snapshot reads it (snapshot s1 of domain vm)",
		"blockcommit", "vm", "xvda", "--pivot")
	_, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "--json", "blockcommit", "vm", "xvda", "--pivot")
	var e errorJSON
	if code != 1 || json.Unmarshal([]byte(stderr), &e) != nil || e.Error.Code != 55 || e.Error.Name != "VIR_ERR_OPERATION_INVALID" {
		t.Fatalf("--json refusal: exit %d, %s", code, stderr)
	}
	if after := c.fileBytes(); after != before {
		t.Fatal("a refused blockcommit changed the folder")
	}
}

// fileBytes is every file of the folder with its content, for a refusal
// that must change nothing.
func (c *cli) fileBytes() string {
	c.t.Helper()
	var b strings.Builder
	for _, f := range c.files() {
		data, err := os.ReadFile(c.path(f))
		if err != nil {
			c.t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s %x\n", f, sha256.Sum256(data))
	}
	return b.String()
}

// TestBlockJobVirshParity: the checks virsh makes before it reaches a
// domain's disks, word for word (stderr; virsh's test driver has no
// block jobs, so only refusals compare).
func TestBlockJobVirshParity(t *testing.T) {
	t.Parallel()
	virsh, err := exec.LookPath("virsh")
	if err != nil {
		t.Skip("virsh is not installed (scripts/deps.sh installs libvirt-clients)")
	}
	c := newTestDomain(t)
	for _, q := range []string{
		"blockcommit",
		"blockcommit test",
		"blockcommit test hda --verbose",
		"blockcommit test hda --async",
		"blockcommit test hda --pivot --keep-overlay",
		"blockcommit test hda --bogus",
		"blockcommit nosuch hda",
		"blockpull",
		"blockpull test hda --verbose",
		"blockpull test hda --async",
		"blockpull nosuch hda --wait",
	} {
		want := virshRun(t, virsh, []string{q})
		got := c.run(q)
		if got.stderr != want.stderr || !got.failed || !want.failed {
			t.Errorf("%s:\nvirsh:\n%s\nxlsnap:\n%s", q, want, got)
		}
	}
}

// TestCrashBlockJobs kills blockcommit and blockpull (SIGKILL) at every
// point they pass, the definition step included. Before any xlsnap call
// the definition must name an image that reads the disk's data (a commit
// and a pull change no data the guest reads); the next call recovers,
// after which the chain is the one before or the one after, every image
// sound, and check finds nothing.
func TestCrashBlockJobs(t *testing.T) {
	for _, sc := range []struct {
		name          string
		op            []string
		before, after []string
	}{
		{"commit-pivot", []string{"blockcommit", "vm", "xvda", "--pivot"},
			[]string{"vm-xvda.b", "vm-xvda.a", "vm-xvda.qcow2"}, []string{"vm-xvda.qcow2"}},
		{"commit-middle", []string{"blockcommit", "vm", "xvda", "--top", "vm-xvda.a", "--wait"},
			[]string{"vm-xvda.b", "vm-xvda.a", "vm-xvda.qcow2"}, []string{"vm-xvda.b", "vm-xvda.qcow2"}},
		{"pull", []string{"blockpull", "vm", "xvda", "--wait"},
			[]string{"vm-xvda.b", "vm-xvda.a", "vm-xvda.qcow2"}, []string{"vm-xvda.b"}},
	} {
		t.Run(sc.name, func(t *testing.T) {
			t.Parallel()
			setup := func() (*cli, []string) {
				c := newCLI(t)
				c.bjSeed()
				op := slices.Clone(sc.op)
				for i, a := range op {
					if strings.HasPrefix(a, "vm-xvda.") {
						op[i] = c.path(a)
					}
				}
				return c, op
			}
			ref, op := setup()
			trace := filepath.Join(t.TempDir(), "trace")
			if _, stderr, code := crashRun(t, ref, "XLSNAP_CRASH_TRACE="+trace, op...); code != 0 {
				t.Fatalf("reference run: exit %d: %s", code, stderr)
			}
			ref.bjChain(sc.after...)
			b, err := os.ReadFile(trace)
			if err != nil {
				t.Fatal(err)
			}
			points := strings.Fields(string(b))
			if len(points) < 4 {
				t.Fatalf("%v passed too few crash points: %v", op, points)
			}
			for _, p := range points {
				c, op := setup()
				c.killAt(p, op...)
				// Before any xlsnap call: what a hypervisor would open.
				c.bjReads()
				qemuImg(t, "check", "-q", "-f", "qcow2", defSource(t, c, "xvda"))
				if out := c.ok("check"); !onlyCoalescible(out) {
					t.Fatalf("killed at %s, then check: %s", p, out)
				}
				c.bjReads()
				var got []string
				for _, l := range c.active("xvda").Chain {
					got = append(got, filepath.Base(l))
				}
				switch {
				case slices.Equal(got, sc.after):
					c.bjChain(sc.after...)
				case slices.Equal(got, sc.before):
					// Undone (or never begun): the job runs again.
					c.ok(op...)
					c.bjChain(sc.after...)
					c.bjReads()
				default:
					t.Fatalf("killed at %s, recovered: chain %v, want %v or %v", p, got, sc.before, sc.after)
				}
			}
			t.Logf("%s: %d kills, each recovered: %v", sc.name, len(points), points)
		})
	}
}

// onlyCoalescible reports whether check's output lists nothing but
// chains that could be shorter (informational: the seed's NO_METADATA
// layers are what no snapshot needs) before "no problems found".
func onlyCoalescible(out string) bool {
	lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
	if len(lines) == 0 || lines[len(lines)-1] != "no problems found" {
		return false
	}
	for _, l := range lines[:len(lines)-1] {
		if !strings.HasPrefix(l, "coalescible ") {
			return false
		}
	}
	return true
}

package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// The oracle: libvirt's own virsh on its test driver (test:///default,
// whose domain "test" takes internal snapshots), run on the same sequence
// as xlsnap on a folder domain "test" with one qcow2 disk. What must
// differ is normalised away and nothing else: creation times (taken a
// moment apart), and the blank line virsh prints on stdout after a
// failed command (xlsnap prints nothing on stdout when it fails, so a
// script's capture stays empty).

// virshSetup builds the tree s1 ─ s2, s1 ─ s3 ─ s4 with s4 current.
var virshSetup = []string{
	"snapshot-create-as test s1",
	"snapshot-create-as test s2",
	"snapshot-revert test s1",
	"snapshot-create-as test s3",
	"snapshot-create-as test s4",
}

// virshEmptyQueries start from a domain with no snapshots.
var virshEmptyQueries = []string{
	"snapshot-list test",
	"snapshot-list test --tree",
	"snapshot-list test --name",
	"snapshot-list test --parent",
	"snapshot-list test --current",
	"snapshot-list test --current --tree",
	"snapshot-info test --current",
	"snapshot-parent test --current",
	"snapshot-revert test --current",
	"snapshot-delete test --current",
	"snapshot-current test",
	"snapshot-current test --name",
	"snapshot-info test s1",
	"snapshot-create-as test s1",
	"snapshot-create-as test s1",
	"snapshot-list test --roots",
	"snapshot-current test --name",
}

// virshQueries run in order after the setup; the last ones change the
// tree, so each sees what the ones before it did.
var virshQueries = []string{
	"snapshot-list test",
	"snapshot-list test --tree",
	"snapshot-list test --parent",
	"snapshot-list test --name",
	"snapshot-list test --leaves",
	"snapshot-list test --no-leaves --name",
	"snapshot-list test --roots",
	"snapshot-list test --from s1",
	"snapshot-list test --from s1 --tree",
	"snapshot-list test --from s1 --descendants",
	"snapshot-list test --from s1 --descendants --tree",
	"snapshot-list test --from s3 --parent",
	"snapshot-list test --current --tree",
	"snapshot-list test --current --descendants --name",
	"snapshot-list test --metadata --name",
	"snapshot-list test --no-metadata",
	"snapshot-list test --no-metadata --tree",
	"snapshot-list test --internal --inactive --name",
	"snapshot-list test --external",
	"snapshot-list --domain test --parent --name",
	"snapshot-info test s1",
	"snapshot-info test --current",
	"snapshot-info --domain test --snapshotname s3",
	"snapshot-info --snapshotname s2 test",
	"snapshot-parent test s4",
	"snapshot-parent test --current",
	"snapshot-current test --name",
	// Errors: lookups, then option checks in virsh's order.
	"snapshot-info test nosuch",
	"snapshot-list nosuch",
	"snapshot-info nosuch s1",
	"snapshot-list test --from nosuch",
	"snapshot-parent test s1",
	"snapshot-list test --tree --parent",
	"snapshot-list test --tree --name --parent",
	"snapshot-list test --parent --tree --roots",
	"snapshot-list test --roots --tree --from s1",
	"snapshot-list test --roots --from s1",
	"snapshot-list test --roots --current",
	"snapshot-list test --from s1 --current",
	"snapshot-list test --descendants",
	"snapshot-list test --leaves --no-leaves --tree",
	"snapshot-list test --no-leaves --tree",
	"snapshot-list test --tree --internal",
	"snapshot-list test --tree --active",
	"snapshot-info test",
	"snapshot-parent test",
	"snapshot-info test s1 --current",
	"snapshot-current test --name s1",
	"snapshot-create-as test n1 --print-xml",
	"snapshot-create-as test --name n2 --description hi --print-xml",
	// Changes, last.
	"snapshot-create test {x1.xml}",
	"snapshot-create --domain test --xmlfile {x1.xml}",
	"snapshot-info test x1",
	"snapshot-create-as --domain test --name s5",
	"snapshot-create-as test s6 described",
	"snapshot-list test --parent",
	"snapshot-current test s2",
	"snapshot-current test --name",
	"snapshot-info test s2",
	"snapshot-revert test --current",
	"snapshot-revert test s3",
	"snapshot-list test --tree",
	"snapshot-current test --name",
}

// virshParseErrors are refused before anything runs; virsh refuses a
// whole command string that holds one, so each runs alone.
var virshParseErrors = []string{
	"snapshot-info test s1 s2",
	"snapshot-list test --bogus",
	"snapshot-list",
	"snapshot-parent --current",
	"snapshot-bogus test",
}

// timeRe is virsh's creation time ("%F %T %z"); its width is fixed, so
// replacing it keeps the table's alignment under test.
var timeRe = regexp.MustCompile(`\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}`)

func normalise(s string) string { return timeRe.ReplaceAllString(s, "YYYY-MM-DD hh:mm:ss +zzzz") }

// result is one command's output.
type result struct {
	stdout, stderr string
	failed         bool
}

func (r result) String() string {
	return fmt.Sprintf("failed=%v\n--- stdout\n%s--- stderr\n%s", r.failed, r.stdout, r.stderr)
}

// virshRun runs commands in one virsh process (each process gets a fresh
// test:///default).
func virshRun(t *testing.T, virsh string, cmds []string) result {
	t.Helper()
	cmd := exec.Command(virsh, "-c", "test:///default", strings.Join(cmds, "; "))
	cmd.Env = append(os.Environ(), "LC_ALL=C", "VIRSH_DEFAULT_CONNECT_URI=")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if _, ok := err.(*exec.ExitError); err != nil && !ok {
		t.Fatal(err)
	}
	return result{stdout: stdout.String(), stderr: stderr.String(), failed: err != nil}
}

// virshQuery is what virsh printed for the last of cmds: the output of
// all of them less the output of all but the last (virsh's exit status
// is its last command's).
func virshQuery(t *testing.T, virsh string, cmds []string) result {
	t.Helper()
	before, all := virshRun(t, virsh, cmds[:len(cmds)-1]), virshRun(t, virsh, cmds)
	out, ok1 := strings.CutPrefix(normalise(all.stdout), normalise(before.stdout))
	errs, ok2 := strings.CutPrefix(all.stderr, before.stderr)
	if !ok1 || !ok2 {
		t.Fatalf("virsh did not repeat itself:\n%s\n%s", before, all)
	}
	r := result{stdout: out, stderr: errs, failed: all.failed}
	if r.failed && r.stdout == "\n" {
		r.stdout = ""
	}
	return r
}

// newTestDomain is a folder source holding a shut-off domain "test" with
// one qcow2 disk: internal snapshots, as the test driver takes.
func newTestDomain(t *testing.T) *cli {
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c := &cli{t: t, dir: dir, state: t.TempDir()}
	qemuImg(t, "create", "-q", "-f", "qcow2", c.path("test.qcow2"), "16M")
	def := fmt.Sprintf(`<domain type='xen'><name>test</name><memory>262144</memory><os><type>linux</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda'/></disk>
</devices></domain>`, c.path("test.qcow2"))
	if err := os.WriteFile(c.path("test.xml"), []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	return c
}

func (c *cli) run(command string) result {
	c.t.Helper()
	stdout, stderr, code := runXlsnap(c.t, append([]string{"--connect", "file://" + c.dir, "--state-dir", c.state}, strings.Fields(command)...)...)
	return result{stdout: normalise(stdout), stderr: stderr, failed: code != 0}
}

// TestVirshParity compares xlsnap's text with virsh's, command by
// command, exactly.
func TestVirshParity(t *testing.T) {
	virsh, err := exec.LookPath("virsh")
	if err != nil {
		t.Skip("virsh is not installed (scripts/deps.sh installs libvirt-clients)")
	}
	t.Run("tree", func(t *testing.T) { compareWithVirsh(t, virsh, virshSetup, virshQueries) })
	t.Run("empty", func(t *testing.T) { compareWithVirsh(t, virsh, nil, virshEmptyQueries) })
	t.Run("parse-errors", func(t *testing.T) {
		c := newTestDomain(t)
		for _, q := range virshParseErrors {
			want := virshRun(t, virsh, []string{q})
			if got := c.run(q); got != want || !want.failed {
				t.Errorf("%s:\nvirsh:\n%s\nxlsnap:\n%s", q, want, got)
			}
		}
	})
}

// compareWithVirsh runs setup, then each query, through both, and
// compares what each query printed. virsh's test domain runs; it is
// shut off first, as a folder domain is.
func compareWithVirsh(t *testing.T, virsh string, setup, queries []string) {
	c := newTestDomain(t)
	// {x1.xml} is a snapshot document both read from one file.
	x1 := filepath.Join(t.TempDir(), "x1.xml") // not in the folder of domain definitions
	if err := os.WriteFile(x1, []byte("<domainsnapshot><name>x1</name><description>from a file</description></domainsnapshot>"), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, s := range setup {
		if r := c.run(s); r.failed {
			t.Fatalf("xlsnap %s:\n%s", s, r)
		}
	}
	done := append([]string{"destroy test"}, setup...)
	for _, q := range queries {
		q = strings.ReplaceAll(q, "{x1.xml}", x1)
		done = append(done, q)
		want := virshQuery(t, virsh, done)
		if got := c.run(q); got != want {
			t.Errorf("%s:\nvirsh:\n%s\nxlsnap:\n%s", q, want, got)
		}
	}
}

// TestVirshNormaliseKeepsDifferences: the normalisation removes creation
// times and nothing else, so the comparison fails on one character.
func TestVirshNormaliseKeepsDifferences(t *testing.T) {
	a := " s1     2026-11-30 08:56:19 +0000   shutoff\n"
	if normalise(a) != normalise(" s1     2031-01-02 23:59:01 -0130   shutoff\n") {
		t.Error("two creation times differ after normalising")
	}
	for i := range a {
		if a[i] >= '0' && a[i] <= '9' && i > 3 {
			continue // a time's digit
		}
		b := []byte(a)
		b[i] = 'x'
		if normalise(a) == normalise(string(b)) {
			t.Errorf("changing byte %d of %q goes unnoticed", i, a)
		}
	}
	if (result{stdout: "s1\n"}) == (result{stdout: "s1\n\n"}) {
		t.Error("a blank line goes unnoticed")
	}
}

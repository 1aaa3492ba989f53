package main

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
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
	"snapshot-revert test",
	"snapshot-delete test",
	"snapshot-info nosuch",
	"snapshot-info nosuch s1 --current",
	// A bare argument fills the next string option: --from here.
	"snapshot-list test s1",
	"snapshot-list test s3 --tree",
	"snapshot-list --domain test s1 --descendants --name",
	"snapshot-info test s1 --current",
	"snapshot-current test --name s1",
	"snapshot-create-as test n1 --print-xml",
	"snapshot-create-as test --name n2 --description hi --print-xml",
	// virsh builds this document itself: its layout, attribute order and
	// escaping, and its spec parsing.
	"snapshot-create-as test --print-xml",
	"snapshot-create-as test n3 a<&>b --print-xml",
	"snapshot-create-as test --print-xml --memspec /m/f",
	"snapshot-create-as test --print-xml --memspec file=/m/f,snapshot=external",
	"snapshot-create-as test --print-xml --memspec snapshot=no",
	"snapshot-create-as test --print-xml --diskspec vda",
	"snapshot-create-as test --print-xml --diskspec vda,snapshot=external,file=/o/a,,b,driver=qcow2 --diskspec vdb,snapshot=no",
	"snapshot-create-as test --print-xml --diskspec vda,stype=block,file=/dev/x",
	"snapshot-create-as test n d vda vdb,snapshot=internal --print-xml",
	"snapshot-create-as test --diskspec vda n --memspec /m --print-xml",
	"snapshot-create-as test --print-xml --memspec a,b",
	"snapshot-create-as test --print-xml --diskspec vda,bogus=1",
	"snapshot-create-as test --print-xml --diskspec vda,stype=network",
	"snapshot-create-as nosuch --print-xml --diskspec vda,bogus=1",
	// Files virsh cannot read, in its words.
	"snapshot-create test /nonexistent",
	"snapshot-create --domain test --xmlfile /nonexistent",
	"snapshot-create test /",
	"snapshot-create nosuch /nonexistent",
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
	"snapshot-dumpxml test",
	"snapshot-dumpxml",
	"snapshot-dumpxml --snapshotname s1",
	"snapshot-list test s1 s2",
	"snapshot-dumpxml test s1 s2",
	"snapshot-create test f1 f2",
	"domblklist",
	"domblklist test x",
}

// timeRe is virsh's creation time ("%F %T %z"); its width is fixed, so
// replacing it keeps the table's alignment under test.
var timeRe = regexp.MustCompile(`\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}`)

// creationRe is the creation time in snapshot XML (seconds since the
// epoch); two virsh runs a second apart differ in it too.
var creationRe = regexp.MustCompile(`<creationTime>\d+</creationTime>`)

func normalise(s string) string {
	s = creationRe.ReplaceAllString(s, "<creationTime>T</creationTime>")
	return timeRe.ReplaceAllString(s, "YYYY-MM-DD hh:mm:ss +zzzz")
}

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
	return virshRunURI(t, virsh, "test:///default", cmds)
}

// virshRunURI runs commands in one virsh process connected to uri.
func virshRunURI(t *testing.T, virsh, uri string, cmds []string) result {
	t.Helper()
	cmd := exec.Command(virsh, "-c", uri, strings.Join(cmds, "; "))
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
func newTestDomain(t *testing.T) *cli { return newDomainFolder(t, "test", "test.qcow2") }

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
	t.Run("tree", func(t *testing.T) { compareWithVirsh(t, virsh, virshSetup, virshQueries, exactly) })
	t.Run("empty", func(t *testing.T) { compareWithVirsh(t, virsh, nil, virshEmptyQueries, exactly) })
	t.Run("dumpxml", func(t *testing.T) {
		compareWithVirsh(t, virsh, append(virshSetup, "snapshot-create-as test s5 described"), virshXMLQueries,
			func(t *testing.T, q string, want, got result) {
				want.stdout, got.stdout = normaliseXML(want.stdout), normaliseXML(got.stdout)
				exactly(t, q, want, got)
			})
	})
	t.Run("domblklist", func(t *testing.T) { compareDomblklist(t, virsh) })
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

// exactly is the comparison of text: what both print must be the same.
func exactly(t *testing.T, q string, want, got result) {
	t.Helper()
	if got != want {
		t.Errorf("%s:\nvirsh:\n%s\nxlsnap:\n%s", q, want, got)
	}
}

// compareWithVirsh runs setup, then each query, through both, and
// compares what each query printed with same. virsh's test domain runs;
// it is shut off first, as a folder domain is.
func compareWithVirsh(t *testing.T, virsh string, setup, queries []string, same func(t *testing.T, q string, want, got result)) {
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
		same(t, q, virshQuery(t, virsh, done), c.run(q))
	}
}

// virshXMLQueries print snapshot XML, after virshSetup and a snapshot s5
// with a description.
var virshXMLQueries = []string{
	"snapshot-dumpxml test s1",
	"snapshot-dumpxml test s4",
	"snapshot-dumpxml --domain test --snapshotname s5",
	"snapshot-current test",
	"snapshot-dumpxml test nosuch",
}

var (
	// The snapshot's copy of the domain: the test driver's domain and a
	// folder's Xen domain share nothing but the name.
	domainRe = regexp.MustCompile(`(?s)\n  <domain .*?\n  </domain>\n`)
	// The test domain's disk is vda; a Xen domain's, xvda.
	diskNameRe = regexp.MustCompile(`name=(['"])x?vda(['"])`)
)

// normaliseXML removes from a snapshot document what must differ
// between the test driver and a folder domain, and nothing else
// (normalise has set creation times aside).
func normaliseXML(s string) string {
	s = domainRe.ReplaceAllString(s, "\n  <domain>DOMAIN</domain>\n")
	return diskNameRe.ReplaceAllString(s, "name=${1}DISK${2}")
}

var emptyElementRe = regexp.MustCompile(`<([A-Za-z]+)([^<>]*?)></([A-Za-z]+)>`)

// xmlFormatting reduces a document to what stays when the formatting is
// taken away (quote style, self-closing tags, the order of lines), to
// tell a difference the driver's formatting makes from one of content.
func xmlFormatting(s string) string {
	s = strings.ReplaceAll(s, `"`, "'")
	s = emptyElementRe.ReplaceAllStringFunc(s, func(m string) string {
		g := emptyElementRe.FindStringSubmatch(m)
		if g[1] != g[3] {
			return m
		}
		return "<" + g[1] + g[2] + "/>"
	})
	lines := strings.Split(s, "\n")
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// compareDomblklist compares domblklist with virsh on a test driver
// holding the same domain as the folder (disks of each kind, a cdrom
// without a medium), so each disk prints the same.
func compareDomblklist(t *testing.T, virsh string) {
	c := newTestDomain(t)
	devices := fmt.Sprintf(`<devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda' bus='xen'/></disk>
<disk type='block' device='disk'><source dev='/dev/null'/><target dev='xvdb' bus='xen'/></disk>
<disk type='file' device='cdrom'><target dev='xvdc' bus='xen'/><readonly/></disk>
</devices>`, c.path("test.qcow2"))
	def := `<domain type='xen'><name>test</name><memory>262144</memory><os><type>linux</type></os>` + devices + `</domain>`
	if err := os.WriteFile(c.path("test.xml"), []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	node := filepath.Join(t.TempDir(), "node.xml")
	testDef := `<node><domain type='test'><name>test</name><memory>262144</memory><os><type>hvm</type></os>` + devices + `</domain></node>`
	if err := os.WriteFile(node, []byte(testDef), 0o644); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		"domblklist test",
		"domblklist test --details",
		"domblklist --domain test --inactive",
		"domblklist test --inactive --details",
		"domblklist nosuch",
	} {
		want := virshRunURI(t, virsh, "test://"+node, []string{q})
		if want.failed && want.stdout == "\n" {
			want.stdout = ""
		}
		exactly(t, q, want, c.run(q))
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

// TestVirshNormaliseXMLKeepsContent: the dumpxml comparison removes what
// must differ and nothing else, and tells formatting from content.
func TestVirshNormaliseXMLKeepsContent(t *testing.T) {
	a := "<domainsnapshot>\n  <name>s1</name>\n  <description>d</description>\n  <creationTime>1</creationTime>\n" +
		"  <disks>\n    <disk name='vda' snapshot='internal'/>\n  </disks>\n  <domain type='test'>\n    <name>test</name>\n  </domain>\n</domainsnapshot>\n"
	b := strings.NewReplacer("'", `"`, "<creationTime>1<", "<creationTime>2<", "vda'/>", `xvda"></disk>`, "type='test'>\n    <name>test", `type="xen">`+"\n    <name>x").Replace(a)
	na, nb := normaliseXML(normalise(a)), normaliseXML(normalise(b))
	if na == nb || xmlFormatting(na) != xmlFormatting(nb) {
		t.Errorf("formatting and what must differ not told from content:\n%s\n%s", na, nb)
	}
	for _, change := range []string{"<name>s1<", "<description>d<", "snapshot='internal'"} {
		c := strings.Replace(a, change, strings.Replace(change, "s", "z", 1)+"x", 1)
		if xmlFormatting(normaliseXML(a)) == xmlFormatting(normaliseXML(c)) {
			t.Errorf("changing %q goes unnoticed", change)
		}
	}
}

// TestPrintXMLEscapes: quotes virsh's own command line passes through but
// the oracle's whitespace split cannot; virsh 9.0 printed exactly this
// for --name "it's" --description 'a"b'.
func TestPrintXMLEscapes(t *testing.T) {
	c := newTestDomain(t)
	got := c.ok("snapshot-create-as", "test", "--print-xml", "--description", `a"b`, "--name", "it's")
	want := "<domainsnapshot>\n  <name>it&apos;s</name>\n  <description>a&quot;b</description>\n</domainsnapshot>\n\n\n"
	if got != want {
		t.Errorf("got %q, want %q", got, want)
	}
}

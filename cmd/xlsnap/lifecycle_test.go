package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

// cli runs xlsnap commands against one folder of domain XML files.
type cli struct {
	t     *testing.T
	dir   string
	state string
}

// newCLI is a folder source holding domain vm with disks xvda and xvdb.
func newCLI(t *testing.T) *cli { return newDomainFolder(t, "vm", "vm-xvda.qcow2", "vm-xvdb.qcow2") }

// newDomainFolder makes a folder source holding one shut-off Xen domain,
// name, whose disks xvda, xvdb, ... are new 16 MiB qcow2 images named
// images in the folder.
func newDomainFolder(t *testing.T, name string, images ...string) *cli {
	dir, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	c := &cli{t: t, dir: dir, state: t.TempDir()}
	var disks strings.Builder
	for i, img := range images {
		qemuImg(t, "create", "-q", "-f", "qcow2", c.path(img), "16M")
		fmt.Fprintf(&disks, "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvd%c'/></disk>\n", c.path(img), 'a'+i)
	}
	def := fmt.Sprintf(`<domain type='xen'><name>%s</name><memory>262144</memory><os><type>linux</type></os><devices>
%s</devices></domain>`, name, disks.String())
	if err := os.WriteFile(c.path(name+".xml"), []byte(def), 0o644); err != nil {
		t.Fatal(err)
	}
	return c
}

func (c *cli) path(name string) string { return filepath.Join(c.dir, name) }

// ok runs a command that must succeed and returns its stdout.
func (c *cli) ok(args ...string) string {
	c.t.Helper()
	stdout, stderr, code := runXlsnap(c.t, append([]string{"--connect", "file://" + c.dir, "--state-dir", c.state}, args...)...)
	if code != 0 {
		c.t.Fatalf("xlsnap %v: exit %d\n%s", args, code, stderr)
	}
	return stdout
}

// fails runs a command that must fail with one line naming want.
func (c *cli) fails(want string, args ...string) {
	c.t.Helper()
	stdout, stderr, code := runXlsnap(c.t, append([]string{"--connect", "file://" + c.dir, "--state-dir", c.state}, args...)...)
	if code == 0 || stdout != "" || strings.Count(strings.TrimSpace(stderr), "\n") != 0 || !strings.Contains(stderr, want) {
		c.t.Fatalf("xlsnap %v: exit %d, stdout %q, stderr %q; want one line with %q", args, code, stdout, stderr, want)
	}
}

func (c *cli) json(v any, args ...string) {
	c.t.Helper()
	out := c.ok(append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		c.t.Fatalf("%v: %v\n%s", args, err, out)
	}
}

type blk struct {
	Target string   `json:"target"`
	Source string   `json:"source"`
	Chain  []string `json:"chain"`
}

func (c *cli) active(disk string) blk {
	c.t.Helper()
	var disks []blk
	c.json(&disks, "domblklist", "vm")
	for _, d := range disks {
		if d.Target == disk {
			return d
		}
	}
	c.t.Fatalf("no disk %s in %+v", disk, disks)
	return blk{}
}

func (c *cli) write(disk string, pattern byte) {
	c.t.Helper()
	if out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", fmt.Sprintf("write -P 0x%02x 0 1M", pattern), c.active(disk).Source).CombinedOutput(); err != nil {
		c.t.Fatalf("qemu-io: %v\n%s", err, out)
	}
}

func (c *cli) expect(disk string, pattern byte) {
	c.t.Helper()
	img := c.active(disk).Source
	out, err := exec.Command("qemu-io", "-r", "-f", "qcow2", "-c", fmt.Sprintf("read -P 0x%02x 0 1M", pattern), img).CombinedOutput()
	if err != nil || strings.Contains(string(out), "verification failed") {
		c.t.Fatalf("%s (%s) does not read 0x%02x: %v\n%s", disk, img, pattern, err, out)
	}
}

func TestLifecycleThroughTheCommand(t *testing.T) {
	c := newCLI(t)
	c.write("xvda", 0x10)
	c.write("xvdb", 0x20)
	if out := c.ok("snapshot-create-as", "vm", "base", "--disk-only", "--description", "first"); out != "Domain snapshot base created\n" {
		t.Fatalf("create output %q", out)
	}
	if got := c.active("xvda"); got.Source != c.path("vm-xvda.base") || !slices.Equal(got.Chain, []string{c.path("vm-xvda.base"), c.path("vm-xvda.qcow2")}) {
		t.Fatalf("xvda after an external snapshot: %+v", got)
	}
	c.write("xvda", 0x11)
	c.ok("snapshot-create-as", "vm", "mixed", "--diskspec", "xvda,snapshot=internal", "--diskspec", "xvdb,snapshot=external,file="+c.path("b-mixed.qcow2"))
	if c.active("xvdb").Source != c.path("b-mixed.qcow2") {
		t.Fatalf("diskspec file= ignored: %+v", c.active("xvdb"))
	}
	c.write("xvda", 0x12)

	var list []snapshotJSON
	c.json(&list, "snapshot-list", "vm")
	if len(list) != 2 || list[0].Name != "base" || list[1].Parent != "base" || !list[1].Current || list[0].Description != "first" {
		t.Fatalf("snapshot-list --json: %+v", list)
	}
	if out := c.ok("snapshot-list", "vm", "--tree"); out != "base\n  |\n  +- mixed\n    \n\n" {
		t.Fatalf("--tree:\n%s", out)
	}
	if out := c.ok("snapshot-list", "vm", "--leaves", "--name"); out != "mixed\n\n" {
		t.Fatalf("--leaves --name: %q", out)
	}
	if out := c.ok("snapshot-current", "vm", "--name"); out != "mixed\n" {
		t.Fatalf("snapshot-current: %q", out)
	}
	if out := c.ok("snapshot-parent", "vm", "mixed"); out != "base\n" {
		t.Fatalf("snapshot-parent: %q", out)
	}
	var doc libvirtxml.DomainSnapshot
	if err := doc.Unmarshal(c.ok("snapshot-dumpxml", "vm", "mixed")); err != nil {
		t.Fatal(err)
	}
	if doc.Name != "mixed" || doc.Parent.Name != "base" || len(doc.Disks.Disks) != 2 || doc.Disks.Disks[0].Snapshot != "internal" ||
		doc.Disks.Disks[1].Source.File.File != c.path("b-mixed.qcow2") || doc.Domain == nil || doc.Domain.Name != "vm" {
		t.Fatalf("dumpxml: %+v", doc)
	}

	c.ok("snapshot-revert", "vm", "base")
	c.expect("xvda", 0x10)
	c.expect("xvdb", 0x20)
	c.ok("snapshot-revert", "vm", "mixed")
	c.expect("xvda", 0x11)

	// Deleting the non-leaf external snapshot merges its images.
	var report struct {
		Deleted []string `json:"deleted"`
		Disks   []struct {
			Disk   string `json:"disk"`
			Action string `json:"action"`
		} `json:"disks"`
	}
	c.json(&report, "snapshot-delete", "vm", "base")
	if !slices.Equal(report.Deleted, []string{"base"}) || len(report.Disks) != 2 {
		t.Fatalf("delete report %+v", report)
	}
	c.expect("xvda", 0x11)
	c.ok("snapshot-revert", "vm", "mixed")
	c.expect("xvda", 0x11)
	if out := c.ok("check"); out != "no problems found\n" {
		t.Fatalf("check: %s", out)
	}

	// The definition on disk follows the disks.
	def, err := os.ReadFile(c.path("vm.xml"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(def), c.active("xvda").Source) {
		t.Fatalf("vm.xml was not rewritten:\n%s", def)
	}
}

func TestCommandErrors(t *testing.T) {
	c := newCLI(t)
	c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	c.fails("error: operation failed: domain moment s1 already exists", "snapshot-create-as", "vm", "s1", "--disk-only")
	c.fails("error: failed to get domain 'nosuch'", "snapshot-list", "nosuch")
	c.fails("error: Domain snapshot not found: no domain snapshot with matching name 'nosuch'", "snapshot-revert", "vm", "nosuch")
	c.fails("no disk", "snapshot-create-as", "vm", "s2", "--diskspec", "xvdz,snapshot=external")
	c.fails("error: XML error: invalid snapshot name '../escape': name can't contain '/'", "snapshot-create-as", "vm", "../escape", "--disk-only")
	c.fails("error: XML error: memory state cannot be saved with offline or disk-only snapshot", "snapshot-create-as", "vm", "s3", "--memspec", c.path("mem"))
	c.fails("unsupported", "snapshot-create-as", "vm", "s4", "--quiesce", "--disk-only")
	c.fails("error: Operation not supported: ", "snapshot-revert", "vm", "s1", "--running")
	bad := c.path("bad.xml")
	if err := os.WriteFile(bad, []byte("<domainsnapshot><name>x</name"), 0o644); err != nil {
		t.Fatal(err)
	}
	c.fails("XML error", "snapshot-create", "vm", bad)
	// Redefine from dumpxml after a metadata-only delete brings it back.
	xml := c.ok("snapshot-dumpxml", "vm", "s1")
	c.ok("snapshot-delete", "vm", "s1", "--metadata")
	saved := c.path("s1.xml")
	if err := os.WriteFile(saved, []byte(xml), 0o644); err != nil {
		t.Fatal(err)
	}
	c.ok("snapshot-create", "vm", saved, "--redefine", "--current")
	if out := c.ok("snapshot-current", "vm", "--name"); out != "s1\n" {
		t.Fatalf("redefined snapshot not current: %q", out)
	}
}

package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// TestCoalesceCommand: a NO_METADATA snapshot leaves each disk's base
// under an overlay nothing needs. check lists both chains (exit 0: no
// fault), coalesce --dry-run says what it would merge and changes
// nothing, coalesce merges, and the data is all there.
func TestCoalesceCommand(t *testing.T) {
	c := newCLI(t)
	c.write("xvda", 0x31)
	c.write("xvdb", 0x41)
	c.ok("snapshot-create-as", "vm", "nm", "--disk-only", "--no-metadata")
	c.write("xvda", 0x32)
	c.write("xvdb", 0x42)
	out := c.ok("check")
	want := ""
	for _, d := range []string{"xvda", "xvdb"} {
		want += fmt.Sprintf("coalescible vm %s %s: the chain could be 1 layer shorter: nothing needs %s [xlsnap coalesce vm merges them]\n",
			d, c.path("vm-"+d+".nm"), c.path("vm-"+d+".qcow2"))
	}
	if want += "no problems found\n"; out != want {
		t.Fatalf("check:\n%s\nwant:\n%s", out, want)
	}
	var dry coalesceJSON
	strict(t, "coalesce --dry-run", c.jsonRun("coalesce", "--dry-run"), &dry)
	if !dry.DryRun || len(dry.Merges) != 2 || dry.Merges[0].Domain != "vm" || dry.Merges[0].Disk != "xvda" ||
		dry.Merges[0].Layer != c.path("vm-xvda.qcow2") {
		t.Fatalf("coalesce --dry-run: %+v", dry)
	}
	out = c.ok("coalesce", "vm", "--dry-run")
	want = ""
	for _, m := range dry.Merges {
		want += fmt.Sprintf("Domain vm disk %s: %s would be merged into %s (%s; %s was needed by nothing)\n", m.Disk, m.Removed, m.Kept, m.Action, m.Layer)
	}
	if want += "2 layers would be merged away\n"; out != want {
		t.Fatalf("coalesce --dry-run:\n%s\nwant:\n%s", out, want)
	}
	if got := c.active("xvda").Chain; len(got) != 2 {
		t.Fatalf("the dry run changed xvda's chain: %v", got)
	}
	out = c.ok("coalesce", "vm")
	if !strings.HasSuffix(out, "2 layers merged away\n") || strings.Count(out, " merged into ") != 2 {
		t.Fatalf("coalesce:\n%s", out)
	}
	for _, d := range []string{"xvda", "xvdb"} {
		if got := c.active(d); len(got.Chain) != 1 || got.Chain[0] != c.path("vm-"+d+".qcow2") {
			t.Fatalf("%s after coalescing: %+v", d, got)
		}
	}
	c.expect("xvda", 0x32)
	c.expect("xvdb", 0x42)
	if out := c.ok("check"); out != "no problems found\n" {
		t.Fatalf("check after coalescing:\n%s", out)
	}
	if out := c.ok("coalesce"); out != "Nothing merged\n" {
		t.Fatalf("a second coalesce: %q", out)
	}
	c.fails("failed to get domain 'nosuch'", "coalesce", "nosuch")
}

// TestDeleteReportsFreedLayers: the delete of an internal snapshot that
// kept an external snapshot's images apart merges them, and says so, in
// text and JSON.
func TestDeleteReportsFreedLayers(t *testing.T) {
	c := newDomainFolder(t, "vm", "vm-xvda.qcow2")
	c.write("xvda", 0x51)
	c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	c.write("xvda", 0x52)
	c.ok("snapshot-create-as", "vm", "i1")
	out := c.ok("snapshot-delete", "vm", "s1")
	if !strings.Contains(out, "s1/xvda: kept-for-internal") {
		t.Fatalf("delete s1:\n%s", out)
	}
	var del deleteJSON
	strict(t, "snapshot-delete", c.jsonRun("snapshot-delete", "vm", "i1", "--progress", "none"), &del)
	if len(del.Coalesced) != 1 || del.Coalesced[0].Layer != c.path("vm-xvda.qcow2") || del.Coalesced[0].Disk != "xvda" {
		t.Fatalf("delete i1: %+v", del)
	}
	if got := c.active("xvda"); len(got.Chain) != 1 {
		t.Fatalf("xvda after the delete: %+v", got)
	}
	c.expect("xvda", 0x52)
}

// TestPoolMaxDepth: --pool DIR,max-depth=N limits the chains in DIR; the
// refusal is libvirt's OPERATION_INVALID (55) and names the layers.
func TestPoolMaxDepth(t *testing.T) {
	c := newDomainFolder(t, "vm", "vm-xvda.qcow2")
	pool := "--pool=" + c.dir + ",max-depth=2"
	c.ok(pool, "snapshot-create-as", "vm", "s1", "--disk-only")
	stdout, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, pool, "--json",
		"snapshot-create-as", "vm", "s2", "--disk-only")
	var e errorJSON
	if code != 1 || stdout != "" || json.Unmarshal([]byte(stderr), &e) != nil || e.Error.Code != 55 ||
		e.Error.Name != "VIR_ERR_OPERATION_INVALID" || !strings.Contains(e.Error.Message, "allows 2 (max_depth)") ||
		!strings.Contains(e.Error.Message, c.path("vm-xvda.qcow2")+" (the state of snapshot s1)") {
		t.Fatalf("a third layer: exit %d, stdout %q, stderr %s", code, stdout, stderr)
	}
	if got := c.active("xvda"); len(got.Chain) != 2 {
		t.Fatalf("the refusal changed xvda: %+v", got)
	}
	// Without the option, the default (30) applies.
	c.ok("snapshot-create-as", "vm", "s2", "--disk-only")
	c.fails("max-depth wants a number of layers", "--pool="+c.dir+",max-depth=none", "snapshot-list", "vm")
}

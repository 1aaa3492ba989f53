package main

import (
	"encoding/json"
	"os"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
)

var rfc3339Re = regexp.MustCompile(`^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$`)

// strict decodes one JSON document into v, refusing unknown keys, and
// checks it has every key of v's type, no null where a list or object
// belongs, and nothing after it: the schema of docs/json.md, exactly.
func strict(t *testing.T, what, data string, v any) {
	t.Helper()
	dec := json.NewDecoder(strings.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		t.Fatalf("%s: %v\n%s", what, err, data)
	}
	if dec.More() {
		t.Fatalf("%s: more than one document:\n%s", what, data)
	}
	var generic any
	if err := json.Unmarshal([]byte(data), &generic); err != nil {
		t.Fatal(err)
	}
	if err := shape(generic, reflect.TypeOf(v).Elem(), "$"); err != "" {
		t.Fatalf("%s: %s\n%s", what, err, data)
	}
}

// shape compares a decoded document with a Go type: every field's key is
// present, and lists and objects are never null.
func shape(v any, typ reflect.Type, path string) string {
	switch typ.Kind() {
	case reflect.Slice:
		list, ok := v.([]any)
		if !ok {
			return path + ": not a list (null?)"
		}
		for i, e := range list {
			if err := shape(e, typ.Elem(), path+"["+strconv.Itoa(i)+"]"); err != "" {
				return err
			}
		}
	case reflect.Struct:
		obj, ok := v.(map[string]any)
		if !ok {
			return path + ": not an object (null?)"
		}
		for key, ft := range fields(typ) {
			val, ok := obj[key]
			if !ok {
				return path + ": no key " + key
			}
			if err := shape(val, ft, path+"."+key); err != "" {
				return err
			}
		}
	}
	return ""
}

// fields are a struct's JSON keys and types, embedded structs flattened.
func fields(typ reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for i := 0; i < typ.NumField(); i++ {
		f := typ.Field(i)
		if f.Anonymous {
			for k, v := range fields(f.Type) {
				out[k] = v
			}
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		out[name] = f.Type
	}
	return out
}

// jsonRun runs a command with --json that must succeed, with nothing on
// stderr.
func (c *cli) jsonRun(args ...string) string {
	c.t.Helper()
	stdout, stderr, code := runXlsnap(c.t, append([]string{"--connect", "file://" + c.dir, "--state-dir", c.state, "--json"}, args...)...)
	if code != 0 || stderr != "" {
		c.t.Fatalf("xlsnap %v: exit %d\n%s", args, code, stderr)
	}
	return stdout
}

func TestJSONSchema(t *testing.T) {
	c := newTestDomain(t)
	var created snapshotJSON
	strict(t, "create-as", c.jsonRun("snapshot-create-as", "test", "--name", "s1", "--description", "first"), &created)
	if created.Name != "s1" || created.Domain != "test" || created.Description != "first" || created.Parent != "" || !created.Current ||
		created.State != "shutoff" || !rfc3339Re.MatchString(created.CreationTime) || created.Location != "internal" ||
		created.MemoryFile != "" || created.Damaged != "" ||
		!reflect.DeepEqual(created.Disks, []diskJSON{{Target: "xvda", Snapshot: "internal", Image: c.path("test.qcow2")}}) {
		t.Fatalf("create-as: %+v", created)
	}
	c.jsonRun("snapshot-create-as", "test", "s2")
	// virsh's way to make s1 current: redefine it with CURRENT. (Kept to
	// internal snapshots: the driver's redefine checks each disk's images
	// against the chain as it is now.)
	var set snapshotJSON
	strict(t, "current NAME", c.jsonRun("snapshot-current", "test", "s1"), &set)
	if set.Name != "s1" || !set.Current {
		t.Fatalf("current NAME: %+v", set)
	}
	c.jsonRun("snapshot-create-as", "test", "s3", "--disk-only")

	var list []snapshotJSON
	strict(t, "list", c.jsonRun("snapshot-list", "test"), &list)
	if len(list) != 3 || list[0].Name != "s1" || list[1].Parent != "s1" || list[2].Location != "external" || !list[2].Current ||
		list[2].Disks[0].Overlay == "" {
		t.Fatalf("list: %+v", list)
	}
	var names []string
	strict(t, "list --name", c.jsonRun("snapshot-list", "test", "--name"), &names)
	if !slices.Equal(names, []string{"s1", "s2", "s3"}) {
		t.Fatalf("list --name: %v", names)
	}
	if out := c.jsonRun("snapshot-list", "test", "--no-metadata", "--name"); out != "[]\n" {
		t.Fatalf("an empty list is %q", out)
	}
	var tree []treeJSON
	strict(t, "list --tree", c.jsonRun("snapshot-list", "test", "--tree"), &tree)
	if len(tree) != 1 || tree[0].Name != "s1" || len(tree[0].Children) != 2 || tree[0].Children[0].Name != "s2" ||
		tree[0].Children[1].Name != "s3" || len(tree[0].Children[1].Children) != 0 {
		t.Fatalf("list --tree: %+v", tree)
	}
	var info infoJSON
	strict(t, "info", c.jsonRun("snapshot-info", "test", "s1"), &info)
	if info.Name != "s1" || info.NumChildren != 2 || info.NumDescendants != 2 || !info.Metadata || info.Current {
		t.Fatalf("info: %+v", info)
	}
	var parent, current snapshotJSON
	strict(t, "parent", c.jsonRun("snapshot-parent", "test", "--current"), &parent)
	strict(t, "current", c.jsonRun("snapshot-current", "test"), &current)
	if parent.Name != "s1" || current.Name != "s3" || !current.Current {
		t.Fatalf("parent %+v, current %+v", parent, current)
	}
	var dump xmlJSON
	strict(t, "dumpxml", c.jsonRun("snapshot-dumpxml", "test", "s2"), &dump)
	if dump.Domain != "test" || dump.Name != "s2" || !strings.HasPrefix(dump.XML, "<domainsnapshot>") {
		t.Fatalf("dumpxml: %+v", dump)
	}
	var printed xmlJSON
	strict(t, "create-as --print-xml", c.jsonRun("snapshot-create-as", "test", "p1", "--print-xml"), &printed)
	if printed != (xmlJSON{Domain: "test", Name: "p1", XML: "<domainsnapshot>\n  <name>p1</name>\n</domainsnapshot>"}) {
		t.Fatalf("create-as --print-xml: %+v", printed)
	}
	var revert revertJSON
	strict(t, "revert", c.jsonRun("snapshot-revert", "test", "s2"), &revert)
	if revert != (revertJSON{Domain: "test", Snapshot: "s2"}) {
		t.Fatalf("revert: %+v", revert)
	}
	var blocks []blockJSON
	strict(t, "domblklist", c.jsonRun("domblklist", "test"), &blocks)
	if len(blocks) != 1 || blocks[0].Target != "xvda" || blocks[0].Format != "qcow2" || len(blocks[0].Chain) != 1 || blocks[0].Pending != "" {
		t.Fatalf("domblklist: %+v", blocks)
	}

	// A merge: its progress is JSON lines on stderr (not a terminal here).
	c.jsonRun("snapshot-revert", "test", "s3")
	stdout, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "--json", "--progress=json", "snapshot-delete", "test", "s3")
	if code != 0 {
		t.Fatalf("delete: exit %d\n%s", code, stderr)
	}
	var del deleteJSON
	strict(t, "delete", stdout, &del)
	if del.Domain != "test" || del.Snapshot != "s3" || !slices.Equal(del.Deleted, []string{"s3"}) || len(del.Disks) != 1 ||
		del.Disks[0].Disk != "xvda" || del.Disks[0].Action == "" || del.Disks[0].Users == nil || del.Collected == nil {
		t.Fatalf("delete: %+v", del)
	}
	lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
	if stderr == "" {
		t.Fatal("a merge under --progress=json printed no progress")
	}
	for _, line := range lines {
		var p progressJSON
		strict(t, "progress", line, &p)
		if p.Progress.Operation == "" || p.Progress.Disk != "xvda" || p.Progress.Percent < 0 || p.Progress.Percent > 100 {
			t.Fatalf("progress: %+v", p)
		}
	}

	if out := c.jsonRun("check"); out != "[]\n" {
		t.Fatalf("a clean check is %q", out)
	}
	var restored restoreJSON
	strict(t, "check --restore", c.jsonRun("check", "--restore", "--force"), &restored)
	if restored.Reason != "forced" || restored.Store == "" || restored.Backup == "" {
		t.Fatalf("check --restore: %+v", restored)
	}

	var layers []chainLayerJSON
	strict(t, "chain", c.jsonRun("chain", c.path("test.qcow2")), &layers)
	if len(layers) != 1 || len(layers[0].Snapshots) != 2 || layers[0].Snapshots[0].Name != "s1" || !rfc3339Re.MatchString(layers[0].Snapshots[0].Date) {
		t.Fatalf("chain: %+v", layers)
	}
}

// TestJSONErrors: under --json a failure is one object on stderr with
// libvirt's code and name, nothing on stdout, and exit code 1.
func TestJSONErrors(t *testing.T) {
	c := newTestDomain(t)
	c.ok("snapshot-create-as", "test", "s1")
	for _, tc := range []struct {
		args []string
		want errorBodyJSON
	}{
		{[]string{"snapshot-info", "test", "nosuch"}, errorBodyJSON{72, "VIR_ERR_NO_DOMAIN_SNAPSHOT", "Domain snapshot not found: no domain snapshot with matching name 'nosuch'"}},
		{[]string{"snapshot-list", "nosuch"}, errorBodyJSON{42, "VIR_ERR_NO_DOMAIN", "failed to get domain 'nosuch'"}},
		{[]string{"snapshot-list", "test", "--tree", "--parent"}, errorBodyJSON{8, "VIR_ERR_INVALID_ARG", "Options --parent and --tree are mutually exclusive"}},
		{[]string{"snapshot-list", "test", "--bogus"}, errorBodyJSON{8, "VIR_ERR_INVALID_ARG", "command 'snapshot-list' doesn't support option --bogus"}},
		{[]string{"snapshot-parent", "test", "s1"}, errorBodyJSON{72, "VIR_ERR_NO_DOMAIN_SNAPSHOT", "snapshot 's1' has no parent"}},
		{[]string{"snapshot-create", "test", "/nonexistent"}, errorBodyJSON{38, "VIR_ERR_SYSTEM_ERROR", "Failed to open file '/nonexistent': No such file or directory"}},
		{[]string{"snapshot-create", "test", "/"}, errorBodyJSON{38, "VIR_ERR_SYSTEM_ERROR", "Failed to read file '/': Is a directory"}},
		{[]string{"snapshot-create-as", "test", "--print-xml", "--diskspec", "vda,bogus"}, errorBodyJSON{8, "VIR_ERR_INVALID_ARG", "unable to parse diskspec: vda,bogus"}},
		// Every missing operand, one line each in text, joined here.
		{[]string{"snapshot-dumpxml"}, errorBodyJSON{8, "VIR_ERR_INVALID_ARG", "command 'snapshot-dumpxml' requires <domain> option\ncommand 'snapshot-dumpxml' requires <snapshotname> option"}},
	} {
		stdout, stderr, code := runXlsnap(t, append([]string{"--connect", "file://" + c.dir, "--state-dir", c.state, "--json"}, tc.args...)...)
		var got errorJSON
		strict(t, strings.Join(tc.args, " "), stderr, &got)
		if code != exitFailed || stdout != "" || got.Error != tc.want {
			t.Errorf("%v: exit %d, stdout %q, error %+v; want %+v", tc.args, code, stdout, got.Error, tc.want)
		}
	}
}

// TestCheckExitCode: problems found are exit code 2, apart from failures.
func TestCheckExitCode(t *testing.T) {
	c := newTestDomain(t)
	c.ok("snapshot-create-as", "test", "s1", "--disk-only")
	if err := os.Remove(c.path("test.qcow2")); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "--json", "check")
	var problems []problemJSON
	strict(t, "check", stdout, &problems)
	var e errorJSON
	strict(t, "check's error", stderr, &e)
	if code != exitProblem || len(problems) == 0 || problems[0].Kind != "missing-image" || e.Error.Code != 9 {
		t.Fatalf("exit %d, problems %+v, error %+v", code, problems, e)
	}
}

package driver_test

import (
	"context"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

var update = flag.Bool("update", false, "rewrite the golden files of TestRedefineGolden")

const goldenUUID = "4a1f0e39-6c2b-4d0e-9f51-2b8d7c3e6a10"

// goldenEnv is a folder source with domain vm: vda on overlay vda.run
// over vda.ext over vda.qcow2 (which holds the internal snapshots the
// cases name), vdb on vdb.qcow2. Each external case names its own
// overlay: two snapshots may not claim one.
func goldenEnv(t *testing.T) (*driver.Driver, string) {
	t.Helper()
	pool, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	base := filepath.Join(pool, "vda.qcow2")
	run("qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
	for _, s := range []string{"base", "checkpoint"} {
		run("qemu-img", "snapshot", "-c", s, base)
	}
	run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, filepath.Join(pool, "vda.ext"))
	run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", filepath.Join(pool, "vda.ext"), filepath.Join(pool, "vda.run"))
	run("qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(pool, "vdb.qcow2"), "1M")
	return openVM(t, pool, goldenUUID, "vda.run", "vdb.qcow2"), pool
}

// TestRedefineGolden redefines each document of testdata/redefine, in
// order (later ones name earlier ones as parents), with VALIDATE, and
// compares its dumpxml with the golden file beside it: every element and
// attribute of libvirt's schema a user or libvirt puts in comes back, and
// what dumpxml prints is valid against libvirt's schema. go test -update
// rewrites the golden files.
func TestRedefineGolden(t *testing.T) {
	d, pool := goldenEnv(t)
	ctx := context.Background()
	inputs, err := filepath.Glob("testdata/redefine/*.xml")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no test documents: %v", err)
	}
	sort.Strings(inputs)
	for _, in := range inputs {
		name := strings.TrimSuffix(filepath.Base(in), ".xml")
		b, err := os.ReadFile(in)
		if err != nil {
			t.Fatal(err)
		}
		doc := strings.ReplaceAll(string(b), "@POOL@", pool)
		s, err := d.SnapshotCreateXML(ctx, "vm", doc, driver.CreateRedefine|driver.CreateValidate)
		if err != nil {
			t.Fatalf("%s: redefine: %v", name, err)
		}
		got, err := d.SnapshotGetXMLDesc(ctx, "vm", s.Name, 0)
		if err != nil {
			t.Fatalf("%s: dumpxml: %v", name, err)
		}
		got = strings.ReplaceAll(got, pool, "@POOL@") + "\n"
		golden := strings.TrimSuffix(in, ".xml") + ".golden"
		if *update {
			if err := os.WriteFile(golden, []byte(got), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		want, err := os.ReadFile(golden)
		if err != nil {
			t.Fatal(err)
		}
		if got != string(want) {
			t.Errorf("%s: dumpxml differs from %s:\n%s", name, golden, got)
		}
		again := strings.ReplaceAll(got, "@POOL@", pool)
		lint := exec.Command("xmllint", "--noout", "--relaxng", "/usr/share/libvirt/schemas/domainsnapshot.rng", "-")
		lint.Stdin = strings.NewReader(again)
		if out, err := lint.CombinedOutput(); err != nil {
			t.Errorf("%s: dumpxml is not valid against libvirt's schema: %v\n%s", name, err, out)
		}
		// What dumpxml printed redefines the snapshot to itself.
		if _, err := d.SnapshotCreateXML(ctx, "vm", again, driver.CreateRedefine|driver.CreateValidate); err != nil {
			t.Errorf("%s: redefining what dumpxml printed: %v", name, err)
		} else if back, _ := d.SnapshotGetXMLDesc(ctx, "vm", s.Name, 0); back != again[:len(again)-1] {
			t.Errorf("%s: a second round trip changed the XML:\n%s", name, back)
		}
	}
}

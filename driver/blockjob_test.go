package driver_test

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage"
)

func bjIO(t *testing.T, path, cmd string) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", "qcow2", "-c", cmd, path).CombinedOutput()
	if err != nil || strings.Contains(string(out), "verification failed") {
		t.Fatalf("qemu-io %s %s: %v\n%s", cmd, path, err, out)
	}
}

// TestBlockCommitDefinition: an active commit of a shut-off domain
// switches the definition to the base before the layers above are
// removed; the report says so, and a pull leaves a one-image chain.
func TestBlockCommitDefinition(t *testing.T) {
	e := newAPIEnv(t)
	// A second driver on a source whose folder the test reads, on the
	// same images.
	defs := t.TempDir()
	doc := `<domain type='xen'><name>vm</name><uuid>5a1c0de2-0000-4000-8000-00000000b10c</uuid><memory unit='KiB'>262144</memory>
<os><type>xen</type></os><devices><disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='` + e.path("vda.qcow2") + `'/><target dev='vda' bus='xen'/></disk></devices></domain>`
	if err := os.WriteFile(filepath.Join(defs, "vm.xml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := driver.NewDirSource(defs)
	if err != nil {
		t.Fatal(err)
	}
	if e.d, err = driver.Open(e.ctx, driver.Config{StateDir: t.TempDir(), Source: src, Pools: []string{e.pool}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.d.Close() })
	bjIO(t, e.path("vda.qcow2"), "write -P 0x11 0 64k")
	e.create("a", driver.CreateDiskOnly|driver.CreateNoMetadata)
	bjIO(t, e.path("vda.a"), "write -P 0x22 64k 64k")
	e.create("b", driver.CreateDiskOnly|driver.CreateNoMetadata)
	bjIO(t, e.path("vda.b"), "write -P 0x33 128k 64k")
	if got := e.chain(); !slices.Equal(got, e.paths("vda.b", "vda.a", "vda.qcow2")) {
		t.Fatalf("chain %v", got)
	}
	r, err := e.d.BlockCommit(e.ctx, "vm", "vda", "", "", 0, driver.BlockCommitActive|driver.BlockCommitShallow)
	if err != nil {
		t.Fatal(err)
	}
	if r.Active != e.path("vda.a") || !slices.Equal(r.Chain, e.paths("vda.a", "vda.qcow2")) || !slices.Equal(r.Removed, e.paths("vda.b")) {
		t.Fatalf("report %+v", r)
	}
	if got := definedSource(t, defs); got != e.path("vda.a") {
		t.Fatalf("the definition names %s after the active commit", got)
	}
	if _, err := os.Stat(e.path("vda.b")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("vda.b after the commit: %v", err)
	}
	r, err = e.d.BlockPull(e.ctx, "vm", e.path("vda.a"), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(r.Chain, e.paths("vda.a")) || !slices.Equal(r.Kept, e.paths("vda.qcow2")) {
		t.Fatalf("pull report %+v", r)
	}
	for _, c := range []string{"read -P 0x11 0 64k", "read -P 0x22 64k 64k", "read -P 0x33 128k 64k"} {
		bjIO(t, e.path("vda.a"), c)
	}
	if got := e.chain(); !slices.Equal(got, e.paths("vda.a")) {
		t.Fatalf("chain after the pull %v", got)
	}
}

func TestBlockJobFlags(t *testing.T) {
	e := newAPIEnv(t)
	e.create("a", driver.CreateDiskOnly|driver.CreateNoMetadata)
	for _, tc := range []struct {
		err  error
		code driver.ErrorNumber
		want string
	}{
		{first(e.d.BlockCommit(e.ctx, "vm", "vda", "", "", 0, driver.BlockCommitActive|driver.BlockCommitDelete)), driver.ErrNumInvalidArg,
			"unsupported flags (0x2) in function virDomainBlockCommit"},
		{first(e.d.BlockCommit(e.ctx, "vm", "vda", "", "", 0, driver.BlockCommitActive|driver.BlockCommitRelative)), driver.ErrNumInvalidArg,
			"unsupported flags (0x8) in function virDomainBlockCommit"},
		{first(e.d.BlockCommit(e.ctx, "vm", "vda", "", "", 10, driver.BlockCommitActive)), driver.ErrNumConfigUnsupported, "bandwidth"},
		{first(e.d.BlockCommit(e.ctx, "vm", "vda", "", "", 0, 0)), driver.ErrNumInvalidArg, "commit of 'vda' active layer requires active flag"},
		{first(e.d.BlockRebase(e.ctx, "vm", "vda", "", 0, driver.BlockRebaseCopy)), driver.ErrNumInvalidArg,
			"unsupported flags (0x8) in function virDomainBlockRebase"},
		{first(e.d.BlockPull(e.ctx, "vm", "vdz", 0, 0)), driver.ErrNumInvalidArg, "disk 'vdz' not found in domain"},
		{first(e.d.BlockPull(e.ctx, "nosuch", "vda", 0, 0)), driver.ErrNumNoDomain, ""},
	} {
		if driver.Code(tc.err) != tc.code || !strings.Contains(tc.err.Error(), tc.want) {
			t.Errorf("got %v (code %d), want %q (%d)", tc.err, driver.Code(tc.err), tc.want, tc.code)
		}
	}
	if got := e.chain(); !slices.Equal(got, e.paths("vda.a", "vda.qcow2")) {
		t.Fatalf("refused calls changed the chain: %v", got)
	}
}

// TestBlockCommitConflictCode: a commit into a snapshot's state image is
// libvirt's VIR_ERR_OPERATION_INVALID, its users named.
func TestBlockCommitConflictCode(t *testing.T) {
	e := newAPIEnv(t)
	e.create("s1", driver.CreateDiskOnly)
	_, err := e.d.BlockCommit(e.ctx, "vm", "vda", "", "", 0, driver.BlockCommitActive)
	var ce *storage.ConflictError
	if driver.Code(err) != driver.ErrNumOperationInvalid || !errors.As(err, &ce) || !strings.Contains(err.Error(), "snapshot s1 of domain vm") {
		t.Fatalf("got %v", err)
	}
}

func first[T any](_ T, err error) error { return err }

// definedSource reads the source of vda from vm.xml in defs.
func definedSource(t *testing.T, defs string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(defs, "vm.xml"))
	if err != nil {
		t.Fatal(err)
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(string(b)); err != nil {
		t.Fatal(err)
	}
	return d.Devices.Disks[0].Source.File.File
}

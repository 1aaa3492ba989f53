package libvirt

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/xenlight"
)

// testHost is libvirt's test driver loaded from a file of its own: unlike
// test:///default, whose state every open connection in the process
// shares, a test://FILE connection has private state. Its one domain,
// dom1, runs with a disk at dir/a.qcow2 (the test driver opens no files).
func testHost(t *testing.T) (h *Hypervisor, dir string) {
	t.Helper()
	dir = t.TempDir()
	node := filepath.Join(dir, "node.xml")
	doc := `<node>
  <domain type='test'>
    <name>dom1</name>
    <uuid>4dea22b3-1d52-d8f3-2516-782e98ab3fa0</uuid>
    <memory unit='MiB'>64</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type='file' device='disk'>
        <source file='` + dir + `/a.qcow2'/>
        <target dev='vda' bus='virtio'/>
      </disk>
    </devices>
  </domain>
</node>`
	if err := os.WriteFile(node, []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	h, err := Open("test://" + node)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h, dir
}

func wantState(t *testing.T, h *Hypervisor, domain string, want xenlight.State) {
	t.Helper()
	got, err := h.State(context.Background(), domain)
	if err != nil {
		t.Fatal(err)
	}
	if got != want {
		t.Fatalf("state of %s = %s, want %s", domain, got, want)
	}
}

func wantCode(t *testing.T, err error, want lv.ErrorNumber) {
	t.Helper()
	var le interface{ LibvirtCode() int }
	if !errors.As(err, &le) || le.LibvirtCode() != int(want) {
		t.Fatalf("error %v: want libvirt code %d", err, want)
	}
}

func xmlOf(t *testing.T, h *Hypervisor, domain string) string {
	t.Helper()
	dom, err := h.Conn().LookupDomainByName(domain)
	if err != nil {
		t.Fatal(err)
	}
	defer dom.Free()
	doc, err := dom.GetXMLDesc(0)
	if err != nil {
		t.Fatal(err)
	}
	return doc
}

func TestPauseResume(t *testing.T) {
	h, _ := testHost(t)
	ctx := context.Background()
	wantState(t, h, "dom1", xenlight.Running)
	if err := h.Pause(ctx, "dom1"); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "dom1", xenlight.Paused)
	if err := h.Resume(ctx, "dom1"); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "dom1", xenlight.Running)
	// Resuming a running domain fails (the test driver calls it an
	// internal error); libvirt's code and its Error are kept.
	err := h.Resume(ctx, "dom1")
	wantCode(t, err, lv.ERR_INTERNAL_ERROR)
	var le lv.Error
	if !errors.As(err, &le) || !strings.Contains(err.Error(), "dom1") {
		t.Fatalf("%v does not carry the libvirt.Error and the domain", err)
	}
}

func TestUnknownDomain(t *testing.T) {
	h, _ := testHost(t)
	ctx := context.Background()
	// The interface: a domain the back end does not run is Shutoff.
	wantState(t, h, "nope", xenlight.Shutoff)
	for name, err := range map[string]error{
		"pause":   h.Pause(ctx, "nope"),
		"resume":  h.Resume(ctx, "nope"),
		"save":    h.SaveMemory(ctx, "nope", filepath.Join(t.TempDir(), "m"), false),
		"destroy": h.Destroy(ctx, "nope"),
	} {
		if !errors.Is(err, errdefs.ErrNoDomain) {
			t.Errorf("%s: %v, want ErrNoDomain", name, err)
			continue
		}
		wantCode(t, err, lv.ERR_NO_DOMAIN)
	}
}

func TestSaveMemoryStops(t *testing.T) {
	h, dir := testHost(t)
	mem := filepath.Join(dir, "dom1.mem")
	if err := h.SaveMemory(context.Background(), "dom1", mem, false); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "dom1", xenlight.Shutoff)
	fi, err := os.Stat(mem)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() == 0 {
		t.Fatal("the memory image is empty")
	}
}

func TestCheckpointUnsupported(t *testing.T) {
	h, dir := testHost(t)
	mem := filepath.Join(dir, "dom1.mem")
	err := h.SaveMemory(context.Background(), "dom1", mem, true)
	if !errors.Is(err, xenlight.ErrLiveUnsupported) {
		t.Fatalf("checkpoint save: %v, want ErrLiveUnsupported", err)
	}
	// Refused before anything was done: the domain runs, no file.
	wantState(t, h, "dom1", xenlight.Running)
	if _, err := os.Stat(mem); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused save left %s: %v", mem, err)
	}
}

// The save/restore hazard: restore must open the disks the definition
// names, not the ones the domain had when it was saved.
func TestRestoreRepointedDisks(t *testing.T) {
	for _, paused := range []bool{false, true} {
		name := map[bool]string{false: "running", true: "paused"}[paused]
		t.Run(name, func(t *testing.T) {
			h, dir := testHost(t)
			ctx := context.Background()
			oldDisk, newDisk := filepath.Join(dir, "a.qcow2"), filepath.Join(dir, "b.qcow2")
			def := xmlOf(t, h, "dom1")
			if !strings.Contains(def, oldDisk) {
				t.Fatalf("definition without %s:\n%s", oldDisk, def)
			}
			mem := filepath.Join(dir, "dom1.mem")
			if err := h.SaveMemory(ctx, "dom1", mem, false); err != nil {
				t.Fatal(err)
			}
			def = strings.ReplaceAll(def, oldDisk, newDisk)
			if err := h.Restore(ctx, "dom1", mem, def, paused); err != nil {
				t.Fatal(err)
			}
			want := xenlight.Running
			if paused {
				want = xenlight.Paused
			}
			wantState(t, h, "dom1", want)
			got := xmlOf(t, h, "dom1")
			if !strings.Contains(got, newDisk) || strings.Contains(got, oldDisk) {
				t.Fatalf("restored domain does not use %s alone:\n%s", newDisk, got)
			}
		})
	}
}

func TestRestoreRefusesBadDefinitions(t *testing.T) {
	h, dir := testHost(t)
	ctx := context.Background()
	def := xmlOf(t, h, "dom1")
	mem := filepath.Join(dir, "dom1.mem")
	if err := h.SaveMemory(ctx, "dom1", mem, false); err != nil {
		t.Fatal(err)
	}
	for name, d := range map[string]string{
		"empty (libvirt would reopen the saved disks)": "",
		"another domain": strings.Replace(def, "<name>dom1</name>", "<name>dom2</name>", 1),
		"not XML":        "<domain",
	} {
		if err := h.Restore(ctx, "dom1", mem, d, false); !errors.Is(err, errdefs.ErrInvalidArg) {
			t.Errorf("%s: %v, want ErrInvalidArg", name, err)
		}
	}
	wantState(t, h, "dom1", xenlight.Shutoff)
	// The refusals left the image as it was: it restores with the old disks.
	if err := h.Restore(ctx, "dom1", mem, def, false); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "dom1", xenlight.Running)
}

func TestDestroy(t *testing.T) {
	h, _ := testHost(t)
	ctx := context.Background()
	if err := h.Destroy(ctx, "dom1"); err != nil {
		t.Fatal(err)
	}
	wantState(t, h, "dom1", xenlight.Shutoff)
	err := h.Destroy(ctx, "dom1")
	if !errors.Is(err, errdefs.ErrOperationInvalid) {
		t.Fatalf("destroying a stopped domain: %v", err)
	}
	wantCode(t, err, lv.ERR_OPERATION_INVALID)
}

func TestDeviceModelUnsupported(t *testing.T) {
	h, _ := testHost(t)
	m, err := h.DeviceModel(context.Background(), "dom1")
	if m != nil || !errors.Is(err, xenlight.ErrLiveUnsupported) {
		t.Fatalf("DeviceModel: %v, %v; want ErrLiveUnsupported", m, err)
	}
}

func TestCancelledContext(t *testing.T) {
	h, dir := testHost(t)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	for name, err := range map[string]error{
		"pause":   h.Pause(ctx, "dom1"),
		"save":    h.SaveMemory(ctx, "dom1", filepath.Join(dir, "m"), false),
		"destroy": h.Destroy(ctx, "dom1"),
	} {
		if !errors.Is(err, context.Canceled) {
			t.Errorf("%s: %v, want context.Canceled", name, err)
		}
	}
	if _, err := h.State(ctx, "dom1"); !errors.Is(err, context.Canceled) {
		t.Errorf("state: %v, want context.Canceled", err)
	}
	wantState(t, h, "dom1", xenlight.Running)
}

func TestNewLeavesConnectionOpen(t *testing.T) {
	conn, err := lv.NewConnect("test:///default")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	h := New(conn)
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if alive, err := conn.IsAlive(); err != nil || !alive {
		t.Fatalf("Close of New closed the caller's connection: %v %v", alive, err)
	}
	// test:///default's built-in domain, through the caller's connection.
	wantState(t, h, "test", xenlight.Running)
}

// TestQMPSocketOf: the second monitor is found only as -qmp with a Unix
// socket; anything else (no passthrough, a TCP monitor, a -qmp without
// its value) is no monitor, and a broken definition is an error.
func TestQMPSocketOf(t *testing.T) {
	const ns = `<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>d</name>`
	for _, c := range []struct{ name, xml, want string }{
		{"unix", ns + `<qemu:commandline><qemu:arg value='-snapshot'/><qemu:arg value='-qmp'/><qemu:arg value='unix:/run/d.qmp,server=on,wait=off'/></qemu:commandline></domain>`, "/run/d.qmp"},
		{"bare path", ns + `<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='unix:/run/d.qmp'/></qemu:commandline></domain>`, "/run/d.qmp"},
		{"none", `<domain type='qemu'><name>d</name></domain>`, ""},
		{"tcp", ns + `<qemu:commandline><qemu:arg value='-qmp'/><qemu:arg value='tcp:localhost:4444,server=on'/></qemu:commandline></domain>`, ""},
		{"no value", ns + `<qemu:commandline><qemu:arg value='-qmp'/></qemu:commandline></domain>`, ""},
	} {
		got, err := QMPSocketOf(c.xml)
		if err != nil || got != c.want {
			t.Errorf("%s: %q, %v; want %q", c.name, got, err, c.want)
		}
	}
	if _, err := QMPSocketOf("<domain"); err == nil {
		t.Error("a broken definition gave no error")
	}
}

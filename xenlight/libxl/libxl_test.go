//go:build libxl

package libxl

import (
	"context"
	"encoding/json"
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/xenlight"
)

func xenHere() bool {
	_, err := os.Stat("/proc/xen")
	return err == nil
}

// Without Xen, New fails with ErrNoXen, libxl's own words and the errno
// (no /dev/xen/privcmd), and frees what it allocated: with -asan,
// LeakSanitizer checks that at exit (it finds the logger if New keeps it).
func TestNewWithoutXen(t *testing.T) {
	if xenHere() {
		t.Skip("/proc/xen exists: this host runs on Xen")
	}
	for range 3 { // again and again: nothing left behind breaks the next
		h, err := New()
		if err == nil {
			h.Close()
			t.Fatal("New succeeded without Xen")
		}
		if !errors.Is(err, ErrNoXen) {
			t.Fatalf("New: %v, want ErrNoXen", err)
		}
		var le *Error
		if !errors.As(err, &le) || le.Code != codeFail || !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("New: %#v, want libxl's ERROR_FAIL and ENOENT", err)
		}
		if !strings.Contains(err.Error(), "cannot open libxc handle") {
			t.Fatalf("New: %q does not carry libxl's message", err)
		}
		t.Log(err)
	}
}

// TestOnXen runs every call on a real domain. It needs a Xen control
// domain (dom0) and XLSNAP_LIBXL_DOMAIN naming a running PV or HVM guest
// with disk xvda on a qdisk back end (qcow2 or raw, not in use by
// anything else). The test takes the guest over: it saves and restores
// it onto an overlay it creates next to the memory image, and destroys
// it at the end.
func TestOnXen(t *testing.T) {
	if !xenHere() {
		t.Skip("no /proc/xen: not running on Xen (the nested-Xen test bed runs this)")
	}
	domain := os.Getenv("XLSNAP_LIBXL_DOMAIN")
	if domain == "" {
		t.Skip("set XLSNAP_LIBXL_DOMAIN to a running guest this test may take over")
	}
	h, err := New()
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	ctx := context.Background()
	dir := t.TempDir()

	want := func(s xenlight.State) {
		t.Helper()
		got, err := h.State(ctx, domain)
		if err != nil {
			t.Fatal(err)
		}
		if got != s {
			t.Fatalf("state %s, want %s", got, s)
		}
	}
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}

	if s, err := h.State(ctx, "xlsnap-no-such-domain"); err != nil || s != xenlight.Shutoff {
		t.Fatalf("unknown domain: %s %v", s, err)
	}
	if err := h.Pause(ctx, "xlsnap-no-such-domain"); !errors.Is(err, errdefs.ErrNoDomain) {
		t.Fatalf("pausing an unknown domain: %v", err)
	}
	if err := h.Destroy(ctx, "Domain-0"); !errors.Is(err, errdefs.ErrOperationInvalid) {
		t.Fatalf("destroying Domain-0: %v", err)
	}

	want(xenlight.Running)
	must(h.Pause(ctx, domain))
	want(xenlight.Paused)
	must(h.Resume(ctx, domain))
	want(xenlight.Running)

	// Checkpoints leave the domain as it was, running or paused.
	for _, paused := range []bool{false, true} {
		if paused {
			must(h.Pause(ctx, domain))
		}
		mem := filepath.Join(dir, "checkpoint.mem")
		must(h.SaveMemory(ctx, domain, mem, true))
		if fi, err := os.Stat(mem); err != nil || fi.Size() == 0 {
			t.Fatalf("checkpoint image: %v", err)
		}
		if paused {
			want(xenlight.Paused)
			must(h.Resume(ctx, domain))
		}
		want(xenlight.Running)
	}

	// The hazard: save, put an overlay on the disk, restore onto it.
	def, err := h.Definition(ctx, domain)
	must(err)
	var cfg struct {
		Disks []struct {
			Path   string `json:"pdev_path"`
			Vdev   string `json:"vdev"`
			Format string `json:"format"`
		} `json:"disks"`
	}
	must(json.Unmarshal([]byte(def), &cfg))
	var base, format string
	for _, d := range cfg.Disks {
		if d.Vdev == "xvda" {
			base, format = d.Path, d.Format
		}
	}
	if base == "" {
		t.Fatalf("%s has no xvda:\n%s", domain, def)
	}
	mem := filepath.Join(dir, "save.mem")
	must(h.SaveMemory(ctx, domain, mem, false))
	want(xenlight.Shutoff)
	overlay := filepath.Join(dir, "overlay.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-F", format, "-b", base, overlay).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img: %v\n%s", err, out)
	}
	def, err = RepointDisks(def, map[string]Disk{"xvda": {Path: overlay, Format: "qcow2"}})
	must(err)
	must(h.Restore(ctx, domain, mem, def, true))
	want(xenlight.Paused)
	if err := h.Restore(ctx, domain, mem, def, true); !errors.Is(err, errdefs.ErrOperationInvalid) {
		t.Fatalf("restoring a running domain: %v", err)
	}

	m, err := h.DeviceModel(ctx, domain)
	must(err)
	var blocks []struct {
		Inserted *struct {
			Image struct {
				Filename string `json:"filename"`
			} `json:"image"`
		} `json:"inserted"`
	}
	err = m.Execute(ctx, "query-block", nil, &blocks)
	m.Disconnect()
	must(err)
	found := false
	for _, b := range blocks {
		found = found || (b.Inserted != nil && b.Inserted.Image.Filename == overlay)
	}
	if !found {
		t.Fatalf("the restored device model does not write to %s: %+v", overlay, blocks)
	}

	must(h.Resume(ctx, domain))
	want(xenlight.Running)
	must(h.Destroy(ctx, domain))
	want(xenlight.Shutoff)
}

func TestClosed(t *testing.T) {
	if !xenHere() {
		t.Skip("no /proc/xen: New cannot succeed here")
	}
	h, err := New()
	if err != nil {
		t.Skip(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal(err)
	}
	if err := h.Close(); err != nil {
		t.Fatal("a second Close:", err)
	}
	if _, err := h.State(context.Background(), "Domain-0"); !errors.Is(err, ErrClosed) {
		t.Fatalf("State after Close: %v", err)
	}
}

package integration

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/qemuimg"
	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/xenlight/qemutest"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// TestErrorCodes: a real failure of each package below the driver is an
// errdefs sentinel (errors.Is) with the libvirt code a toolstack expects
// (errdefs.CodeOf), and the package's own finer sentinel still matches.
func TestErrorCodes(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	p := func(name string) string { return filepath.Join(dir, name) }
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", p("base.qcow2"), "1M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", p("base.qcow2"), p("top.qcow2"))

	// A qcow2 header cut short.
	head, err := os.ReadFile(p("base.qcow2"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p("cut.qcow2"), head[:48], 0o600); err != nil {
		t.Fatal(err)
	}
	// An overlay whose backing file is gone.
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", p("gone.qcow2"), "1M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", p("gone.qcow2"), p("orphan.qcow2"))
	if err := os.Remove(p("gone.qcow2")); err != nil {
		t.Fatal(err)
	}
	// An overlay whose backing file is in another folder.
	other := t.TempDir()
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", p("base.qcow2"), filepath.Join(other, "escape.qcow2"))
	// A metadata store that is not a database.
	if err := os.WriteFile(p("xlsnap.db"), make([]byte, 4096), 0o600); err != nil {
		t.Fatal(err)
	}

	walk := func(path string) error {
		_, err := chain.Walk(ctx, path, chain.FormatQcow2, chain.Policy{})
		return err
	}
	var img qemuimg.Runner

	// A device model holds top.qcow2 (locked for qemu-img) and serves QMP.
	dm := qemutest.Start(t, qemutest.SocketPath(t, "qmp"), []qemutest.Disk{{NodeName: "xvda", Path: p("top.qcow2"), Format: "qcow2"}})
	m, err := qmp.Dial(ctx, "unix", dm.Socket)
	if err != nil {
		t.Fatalf("%v\n%s", err, dm.Stderr())
	}
	defer m.Disconnect()
	replyErr := m.Execute(ctx, "device_del", map[string]any{"id": "nosuch"}, nil)
	lockedErr := img.SnapshotCreate(ctx, p("top.qcow2"), "qcow2", "s1")
	if err := dm.Cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	// No reply comes from a killed QEMU: the monitor's read of the socket
	// ends instead.
	closedErr := m.Execute(ctx, "query-status", nil, nil)

	_, missingErr := img.Check(ctx, p("missing.qcow2"), "qcow2")
	_, damagedErr := metastore.OpenBolt(ctx, p("xlsnap.db"))

	for _, tc := range []struct {
		name string
		err  error
		own  error // the package's own sentinel
		kind *errdefs.Error
		code errdefs.Code
	}{
		{"chain: truncated qcow2 header", walk(p("cut.qcow2")), chain.ErrInvalidImage, errdefs.ErrInvalidImage, errdefs.CodeOperationFailed},
		{"chain: missing backing file", walk(p("orphan.qcow2")), chain.ErrChainBroken, errdefs.ErrChainBroken, errdefs.CodeOperationFailed},
		{"chain: backing outside the roots", walk(filepath.Join(other, "escape.qcow2")), chain.ErrOutsideRoots, errdefs.ErrUnsafeBacking, errdefs.CodeConfigUnsupported},
		{"qemuimg: missing file", missingErr, qemuimg.ErrNotFound, errdefs.ErrNotFound, errdefs.CodeOperationFailed},
		{"qemuimg: image locked by a device model", lockedErr, qemuimg.ErrLocked, errdefs.ErrLocked, errdefs.CodeResourceBusy},
		{"qemuimg: invalid argument", img.SnapshotCreate(ctx, p("top.qcow2"), "qcow2", ""), qemuimg.ErrInvalidArg, errdefs.ErrInvalidArg, errdefs.CodeInvalidArg},
		{"qmp: error reply", replyErr, replyErr, errdefs.ErrHypervisor, errdefs.CodeOperationFailed},
		{"qmp: connection closed", closedErr, qmp.ErrClosed, errdefs.ErrHypervisor, errdefs.CodeOperationFailed},
		{"metastore: damaged store", damagedErr, metastore.ErrDamaged, errdefs.ErrDamaged, errdefs.CodeOperationFailed},
	} {
		if tc.err == nil || !errors.Is(tc.err, tc.own) || !errors.Is(tc.err, tc.kind) {
			t.Errorf("%s: %v, want %v and %v", tc.name, tc.err, tc.own, tc.kind)
		}
		if got := errdefs.CodeOf(tc.err); got != tc.code {
			t.Errorf("%s: %v: code %v, want %v", tc.name, tc.err, got, tc.code)
		}
	}

	// A qemu-img call cancelled while it runs is aborted, whatever else
	// the error holds. Opening a FIFO blocks until a writer comes, so
	// qemu-img waits there until the cancel kills it.
	fifo := p("fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(ctx)
	time.AfterFunc(200*time.Millisecond, cancel)
	_, err = img.Check(cctx, fifo, "qcow2")
	if !errors.Is(err, context.Canceled) || errdefs.CodeOf(err) != errdefs.CodeOperationAborted {
		t.Errorf("cancelled qemu-img: %v: code %v, want VIR_ERR_OPERATION_ABORTED", err, errdefs.CodeOf(err))
	}
}

// Package qemutest starts real QEMU processes for tests: the device model
// alone (TCG, headless, no guest), with qcow2 disks attached as -blockdev
// nodes and a QMP socket. Not a fake: the QEMU xlsnap drives in tests.
package qemutest

import (
	"bytes"
	"context"
	"strings"

	"fmt"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// Disk is one disk to attach: NodeName names its format node (the name
// QMP commands use), Path the image, Format its format.
type Disk struct {
	NodeName string
	Path     string
	Format   string
}

// Process is a running QEMU.
type Process struct {
	Cmd    *exec.Cmd
	Socket string
	stderr *bytes.Buffer
}

// Args are the command-line arguments for a device model with disks whose
// QMP monitor listens on the socket passed as file descriptor 3.
func Args(disks []Disk) []string {
	args := []string{"-machine", "q35,accel=tcg", "-nodefaults", "-display", "none", "-S",
		"-chardev", "socket,id=qmp,fd=3,server=on,wait=off", "-mon", "chardev=qmp,mode=control"}
	for i, d := range disks {
		args = append(args,
			"-blockdev", fmt.Sprintf("driver=file,filename=%s,node-name=file-%s", d.Path, d.NodeName),
			"-blockdev", fmt.Sprintf("driver=%s,file=file-%s,node-name=%s", d.Format, d.NodeName, d.NodeName),
			// share-rw lets GuestIO write as the guest would, beside the device.
			"-device", fmt.Sprintf("virtio-blk-pci,drive=%s,id=dev%d,share-rw=on", d.NodeName, i))
	}
	return args
}

// Start runs qemu-system-x86_64 with the disks. The QMP socket is bound
// here and handed to QEMU already listening, so it answers at once and no
// start-up wait is needed; the test's cleanup kills QEMU.
func Start(t testing.TB, socket string, disks []Disk) *Process {
	t.Helper()
	bin, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		t.Fatal("qemu-system-x86_64 not found: run `make deps` (it installs qemu-system-x86)")
	}
	l, err := net.Listen("unix", socket)
	if err != nil {
		t.Fatal(err)
	}
	ul := l.(*net.UnixListener)
	ul.SetUnlinkOnClose(false) // QEMU keeps listening on it
	lf, err := ul.File()
	ul.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer lf.Close()
	p := &Process{Socket: socket, stderr: &bytes.Buffer{}}
	p.Cmd = exec.Command(bin, Args(disks)...)
	p.Cmd.Stderr = p.stderr
	p.Cmd.ExtraFiles = []*os.File{lf}
	if err := p.Cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { p.Cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		p.Cmd.Process.Kill()
		<-exited
	})
	return p
}

// Stderr is what QEMU printed so far.
func (p *Process) Stderr() string { return p.stderr.String() }

// SocketPath is a short socket path (unix sockets allow ~108 bytes).
func SocketPath(t testing.TB, name string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "qmp")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return filepath.Join(dir, name)
}

// GuestWrite writes pattern over [off, off+length) of a block node inside
// the device model, standing in for the guest's own writes, and flushes
// so the image on disk holds it. (HMP's qemu-io prints its result on
// QEMU's stdout, not on the monitor: callers read the data back from the
// image instead.)
func GuestWrite(ctx context.Context, m *qmp.Monitor, node string, pattern byte, off, length int) error {
	for _, c := range []string{fmt.Sprintf("write -P 0x%02x %d %d", pattern, off, length), "flush"} {
		var out string
		if err := m.Execute(ctx, "human-monitor-command", map[string]any{
			"command-line": fmt.Sprintf("qemu-io %s %q", node, c)}, &out); err != nil {
			return err
		}
		if strings.TrimSpace(out) != "" {
			return fmt.Errorf("qemu-io %s %q: %s", node, c, out)
		}
	}
	return nil
}

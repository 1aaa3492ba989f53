// Package qemu is the xenlight back end for a plain QEMU process: the
// device model alone, reached at its QMP socket. It drives disks (live
// snapshots, block jobs, pause and resume); Xen keeps guest memory outside
// QEMU, so memory save and restore are ErrLiveUnsupported here.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"syscall"

	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// Backend finds each domain's device model by its QMP socket.
type Backend struct {
	socketFor func(domain string) string
}

var _ xenlight.Hypervisor = (*Backend)(nil)

// New returns a back end; socketFor maps a domain to its QMP socket path.
func New(socketFor func(domain string) string) *Backend { return &Backend{socketFor: socketFor} }

func (b *Backend) DeviceModel(ctx context.Context, domain string) (*qmp.Monitor, error) {
	return qmp.Dial(ctx, "unix", b.socketFor(domain))
}

// State is Shutoff when no device model answers at the socket.
func (b *Backend) State(ctx context.Context, domain string) (xenlight.State, error) {
	m, err := b.DeviceModel(ctx, domain)
	var opErr *net.OpError
	if errors.As(err, &opErr) || errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED) {
		return xenlight.Shutoff, nil
	}
	if err != nil {
		return "", err
	}
	defer m.Disconnect()
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := m.Execute(ctx, "query-status", nil, &st); err != nil {
		return "", err
	}
	if st.Running {
		return xenlight.Running, nil
	}
	return xenlight.Paused, nil
}

func (b *Backend) run(ctx context.Context, domain, command string) error {
	m, err := b.DeviceModel(ctx, domain)
	if err != nil {
		return err
	}
	defer m.Disconnect()
	return m.Execute(ctx, command, nil, nil)
}

func (b *Backend) Pause(ctx context.Context, domain string) error  { return b.run(ctx, domain, "stop") }
func (b *Backend) Resume(ctx context.Context, domain string) error { return b.run(ctx, domain, "cont") }

// Destroy quits the device model.
func (b *Backend) Destroy(ctx context.Context, domain string) error {
	err := b.run(ctx, domain, "quit")
	if errors.Is(err, qmp.ErrClosed) {
		return nil // QEMU went away while answering: that is the point
	}
	return err
}

func (b *Backend) SaveMemory(ctx context.Context, domain, path string, checkpoint bool) error {
	return fmt.Errorf("%w: %s runs on a bare device model, which holds no Xen guest memory", xenlight.ErrLiveUnsupported, domain)
}

// CanRestore is false: a bare device model holds no Xen guest memory.
func (b *Backend) CanRestore() bool { return false }

func (b *Backend) Restore(ctx context.Context, domain, path, definition string, paused bool) error {
	return fmt.Errorf("%w: a bare device model cannot restore %s from a memory image", xenlight.ErrLiveUnsupported, domain)
}

// Package xenlight drives active domains: pause and resume, memory save
// and restore, and the device model's QMP for live disk snapshots and
// block jobs. libxl is used only for active domains, as the Xen-devel
// review asked; inactive ones are storage's business alone. Back ends:
// qemu (a plain device model process), libvirt (any libvirt URI) and
// libxl (cgo, build tag libxl).
package xenlight

import (
	"context"
	"fmt"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// ErrLiveUnsupported is returned by a back end for what it cannot do on
// a live domain (a memory snapshot on a bare device model, say).
var ErrLiveUnsupported = errdefs.ErrLiveUnsupported

// State is a domain's state as libvirt names it.
type State string

const (
	Shutoff State = "shutoff"
	Running State = "running"
	Paused  State = "paused"
)

// Hypervisor is what the driver needs of a back end for active domains.
type Hypervisor interface {
	// State reports a domain's state; a domain the back end does not run
	// is Shutoff.
	State(ctx context.Context, domain string) (State, error)
	Pause(ctx context.Context, domain string) error
	Resume(ctx context.Context, domain string) error
	// SaveMemory writes the domain's memory to path. With checkpoint the
	// domain stays as it was (libxl's checkpoint save); without, the save
	// stops it.
	SaveMemory(ctx context.Context, domain, path string, checkpoint bool) error
	// Restore starts a domain from a memory image with the given
	// definition, whose disks must already point at the layers the
	// domain is to write: a restore that reopened the old disks would
	// lose everything written since the snapshot.
	Restore(ctx context.Context, domain, path, definition string, paused bool) error
	// Destroy stops the domain at once.
	Destroy(ctx context.Context, domain string) error
	// DeviceModel connects to the domain's QMP monitor for one operation;
	// the caller disconnects when done (QEMU serves one client at a time).
	DeviceModel(ctx context.Context, domain string) (*qmp.Monitor, error)
}

// RestoreLimiter is the optional ability of a back end to say up front
// that it cannot restore a domain from a memory image, so a revert to a
// memory snapshot is refused before its first change, not after the
// disks were reverted.
type RestoreLimiter interface {
	// CanRestore reports whether Restore can work at all.
	CanRestore() bool
}

// LibxlQMPSocket is where libxl puts the QMP socket of domain domid's
// device model (QEMU's -qmp), whoever drives libxl: xl, the libxl back
// end, or libvirt's libxl driver.
func LibxlQMPSocket(domid uint32) string {
	return fmt.Sprintf("/var/run/xen/qmp-libxl-%d", domid)
}

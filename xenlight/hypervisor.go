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

// VCPUPauser is a back end whose guests' vCPUs the device model does not
// run (Xen schedules them): QMP stop leaves them running, so what must
// hold a guest still (an active commit's pivot) also pauses it through
// the back end (Pause, Resume).
type VCPUPauser interface {
	// PausesVCPUs says whether the domains' vCPUs are the back end's to
	// pause; an error when that cannot be known now.
	PausesVCPUs(ctx context.Context) (bool, error)
}

// RestoreLimiter is the optional ability of a back end to say up front
// that it cannot restore a domain from a memory image, so a revert to a
// memory snapshot is refused before its first change, not after the
// disks were reverted.
type RestoreLimiter interface {
	// CanRestore reports whether Restore can work at all.
	CanRestore() bool
}

// LiveSaver is the optional ability of a back end to save a running
// domain's memory live, as migration does, and to hold the guest stopped
// at the saved point until the caller lets it go on: what must match the
// memory (the disks' snapshot) is taken in that window. libxl has it
// (LIBXL_SUSPEND_LIVE); libvirt's libxl driver has no checkpoint save at
// all, and a bare device model holds no guest memory.
type LiveSaver interface {
	// SaveMemoryLive writes the memory to path while the guest runs and
	// returns with it stopped at the saved point; resume lets it go on
	// (paused if it was). A crash before resume leaves the domain
	// Paused, and Resume lets it go on too.
	SaveMemoryLive(ctx context.Context, domain, path string) (resume func(context.Context) error, err error)
}

// LibxlQMPSocket is where libxl puts the QMP socket of domain domid's
// device model (QEMU's -qmp), whoever drives libxl: xl, the libxl back
// end, or libvirt's libxl driver.
func LibxlQMPSocket(domid uint32) string {
	return fmt.Sprintf("/var/run/xen/qmp-libxl-%d", domid)
}

// Package storage owns what is on disk: pools of images, the image and
// snapshot trees of every domain and their metadata, the journal that
// makes each operation crash-safe, per-domain locks and chain events.
package storage

import (
	"fmt"

	"github.com/xlsnap/xlsnap/errdefs"
)

// The error vocabulary is errdefs'; these names keep storage's callers
// unchanged. errdefs.CodeOf gives the libvirt code of each.
var (
	ErrNoDomain         = errdefs.ErrNoDomain
	ErrNoSnapshot       = errdefs.ErrNoSnapshot
	ErrSnapshotExists   = errdefs.ErrSnapshotExists
	ErrInvalidArg       = errdefs.ErrInvalidArg
	ErrOperationInvalid = errdefs.ErrOperationInvalid
	ErrLiveUnsupported  = errdefs.ErrLiveUnsupported
	ErrUnsupported      = errdefs.ErrUnsupported
	ErrBusy             = errdefs.ErrBusy
	// ErrLeaks: an image holds leaked clusters only (no corruption), as a
	// killed qemu-img commit or rebase leaves; Repair frees them. Its own
	// value so check can tell it from corruption; an operation failed all
	// the same.
	ErrLeaks = fmt.Errorf("%w: image has leaked clusters", errdefs.ErrOperationFailed)
	// ErrPending: an operation could not finish and cannot be undone; its
	// intent stays in the journal and Open or Repair finishes it.
	ErrPending = errdefs.ErrPending

	// ErrDamaged: the metadata file cannot be trusted (empty, cut short,
	// pages bbolt did not write); RestoreStore puts back the last copy.
	ErrDamaged = errdefs.ErrDamaged

	ErrChainBroken   = errdefs.ErrChainBroken
	ErrUnsafeBacking = errdefs.ErrUnsafeBacking
)

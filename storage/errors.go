// Package storage owns what is on disk: pools of images, the image and
// snapshot trees of every domain and their metadata, the journal that
// makes each operation crash-safe, per-domain locks and chain events.
package storage

import (
	"errors"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// The error vocabulary of xlsnap. driver/ maps each to a libvirt error code.
var (
	ErrNoDomain         = errors.New("domain not found")
	ErrNoSnapshot       = errors.New("domain snapshot not found")
	ErrSnapshotExists   = errors.New("domain snapshot exists")
	ErrInvalidArg       = errors.New("invalid argument")
	ErrOperationInvalid = errors.New("operation invalid")
	ErrLiveUnsupported  = errors.New("live operation not supported")
	ErrUnsupported      = errors.New("unsupported")
	ErrBusy             = errors.New("domain is busy with another operation")
	// ErrLeaks: an image holds leaked clusters only (no corruption), as a
	// killed qemu-img commit or rebase leaves; Repair frees them.
	ErrLeaks = errors.New("image has leaked clusters")
	// ErrPending: an operation could not finish and cannot be undone; its
	// intent stays in the journal and Open or Repair finishes it.
	ErrPending = errors.New("operation pending in the journal")

	// ErrDamaged: the metadata file cannot be trusted (empty, cut short,
	// pages bbolt did not write); RestoreStore puts back the last copy.
	ErrDamaged = metastore.ErrDamaged

	// Chain errors come from chain/ unchanged.
	ErrChainBroken   = chain.ErrChainBroken
	ErrUnsafeBacking = chain.ErrUnsafeBacking
)

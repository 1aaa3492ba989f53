package chain

import (
	"fmt"

	"github.com/xlsnap/xlsnap/errdefs"
)

// Sentinels, each an errdefs one or wrapping one, so errdefs.CodeOf gives
// their libvirt code. The specific backing refusals wrap ErrUnsafeBacking
// so a caller can match either the family or the exact reason with
// errors.Is.
var (
	// ErrInvalidImage: the header is malformed or out of the format's bounds.
	ErrInvalidImage = errdefs.ErrInvalidImage
	// ErrUnsupported: a well-formed image that this reader must not interpret
	// (unknown incompatible features, other formats, external data files
	// when the policy forbids them). Its own value, so a caller can tell it
	// from a malformed header; it is an errdefs.ErrInvalidImage all the same.
	ErrUnsupported = fmt.Errorf("%w: unsupported", errdefs.ErrInvalidImage)
	// ErrCorrupt: qcow2's corrupt bit is set; QEMU itself refuses to write it.
	ErrCorrupt = fmt.Errorf("%w: marked corrupt", errdefs.ErrInvalidImage)
	// ErrChainBroken: a backing file the chain needs does not exist.
	ErrChainBroken = errdefs.ErrChainBroken
	// ErrTooLarge: the chain's metadata is within the format's bounds but
	// more than the policy lets one walk read (Policy.MaxSnapshotBytes).
	ErrTooLarge = fmt.Errorf("%w: metadata too large", errdefs.ErrInvalidImage)

	ErrUnsafeBacking   = errdefs.ErrUnsafeBacking
	ErrOutsideRoots    = fmt.Errorf("%w: resolves outside the allowed roots", ErrUnsafeBacking)
	ErrNoBackingFormat = fmt.Errorf("%w: no backing format given and probing is not allowed", ErrUnsafeBacking)
	ErrProtocol        = fmt.Errorf("%w: protocol or json: reference not allowed", ErrUnsafeBacking)
	ErrLoop            = fmt.Errorf("%w: backing loop", ErrUnsafeBacking)
	ErrTooDeep         = fmt.Errorf("%w: chain deeper than the policy allows", ErrUnsafeBacking)
)

// ImageError names the image whose header was refused.
type ImageError struct {
	Path string
	Err  error
}

func (e *ImageError) Error() string { return fmt.Sprintf("image %s: %v", e.Path, e.Err) }
func (e *ImageError) Unwrap() error { return e.Err }

// BackingError names the image and the reference it holds that was refused.
type BackingError struct {
	Image     string
	Reference string
	Err       error
}

func (e *BackingError) Error() string {
	return fmt.Sprintf("image %s: backing reference %q: %v", e.Image, e.Reference, e.Err)
}
func (e *BackingError) Unwrap() error { return e.Err }

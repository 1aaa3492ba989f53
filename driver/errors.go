// Package driver is xlsnap's front door, in libvirt's own terms: domain
// snapshot XML, libvirt's call names, flags and semantics, and typed
// errors that carry the libvirt error code a toolstack would return.
package driver

import (
	"errors"
	"fmt"

	"github.com/xlsnap/xlsnap/storage"
)

// The error vocabulary (shared with storage/).
var (
	ErrNoDomain         = storage.ErrNoDomain
	ErrNoSnapshot       = storage.ErrNoSnapshot
	ErrSnapshotExists   = storage.ErrSnapshotExists
	ErrInvalidArg       = storage.ErrInvalidArg
	ErrOperationInvalid = storage.ErrOperationInvalid
	ErrLiveUnsupported  = storage.ErrLiveUnsupported
	ErrUnsupported      = storage.ErrUnsupported
	ErrChainBroken      = storage.ErrChainBroken
	ErrUnsafeBacking    = storage.ErrUnsafeBacking
	ErrBusy             = storage.ErrBusy
	ErrDamaged          = storage.ErrDamaged
	// ErrXML: a snapshot or domain XML document that does not parse.
	ErrXML = errors.New("XML error")
	// ErrDuplicateUUID: two definitions of one source claim one UUID
	// (a copied NAME.xml): libvirt refuses the second as "already
	// defined", and xlsnap uses neither, or they would share snapshots.
	ErrDuplicateUUID = errors.New("domain already defined with this uuid")
)

// ErrorNumber is libvirt's virErrorNumber.
type ErrorNumber int

// The libvirt error codes xlsnap's errors map to (virterror.h).
const (
	ErrNumInternal             ErrorNumber = 1  // VIR_ERR_INTERNAL_ERROR
	ErrNumInvalidArg           ErrorNumber = 8  // VIR_ERR_INVALID_ARG
	ErrNumOperationFailed      ErrorNumber = 9  // VIR_ERR_OPERATION_FAILED
	ErrNumXML                  ErrorNumber = 27 // VIR_ERR_XML_ERROR
	ErrNumNoDomain             ErrorNumber = 42 // VIR_ERR_NO_DOMAIN
	ErrNumOperationInvalid     ErrorNumber = 55 // VIR_ERR_OPERATION_INVALID
	ErrNumConfigUnsupported    ErrorNumber = 67 // VIR_ERR_CONFIG_UNSUPPORTED
	ErrNumOperationTimeout     ErrorNumber = 68 // VIR_ERR_OPERATION_TIMEOUT
	ErrNumNoDomainSnapshot     ErrorNumber = 72 // VIR_ERR_NO_DOMAIN_SNAPSHOT
	ErrNumOperationUnsupported ErrorNumber = 84 // VIR_ERR_OPERATION_UNSUPPORTED
)

// codes maps each sentinel to what libvirt reports for the same failure
// (an existing snapshot name is "operation failed" in libvirt too; a busy
// domain is its "cannot acquire state change lock" timeout).
var codes = []struct {
	err  error
	code ErrorNumber
}{
	{ErrNoDomain, ErrNumNoDomain},
	{ErrNoSnapshot, ErrNumNoDomainSnapshot},
	{ErrSnapshotExists, ErrNumOperationFailed},
	{ErrInvalidArg, ErrNumInvalidArg},
	{ErrOperationInvalid, ErrNumOperationInvalid},
	{ErrLiveUnsupported, ErrNumOperationUnsupported},
	{ErrUnsupported, ErrNumConfigUnsupported},
	{ErrUnsafeBacking, ErrNumConfigUnsupported},
	{ErrChainBroken, ErrNumOperationFailed},
	{ErrBusy, ErrNumOperationTimeout},
	{ErrXML, ErrNumXML},
	{ErrDuplicateUUID, ErrNumOperationFailed},
	{storage.ErrPending, ErrNumOperationFailed},
	{ErrDamaged, ErrNumOperationFailed},
}

// Code is the libvirt error code for err: what a toolstack returns to its
// own callers unchanged.
func Code(err error) ErrorNumber {
	var le interface{ LibvirtCode() int }
	if errors.As(err, &le) {
		return ErrorNumber(le.LibvirtCode())
	}
	for _, c := range codes {
		if errors.Is(err, c.err) {
			return c.code
		}
	}
	return ErrNumInternal
}

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidArg}, args...)...)
}

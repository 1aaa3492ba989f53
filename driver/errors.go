// Package driver is xlsnap's front door, in libvirt's own terms: domain
// snapshot XML, libvirt's call names, flags and semantics, and typed
// errors that carry the libvirt error code a toolstack would return.
package driver

import (
	"fmt"

	"github.com/xlsnap/xlsnap/errdefs"
)

// The error vocabulary: errdefs' sentinels under the driver's names, each
// carrying its libvirt code (see errdefs for when each is returned).
var (
	ErrNoDomain         = errdefs.ErrNoDomain
	ErrNoSnapshot       = errdefs.ErrNoSnapshot
	ErrSnapshotExists   = errdefs.ErrSnapshotExists
	ErrInvalidArg       = errdefs.ErrInvalidArg
	ErrOperationInvalid = errdefs.ErrOperationInvalid
	ErrOperationFailed  = errdefs.ErrOperationFailed
	ErrLiveUnsupported  = errdefs.ErrLiveUnsupported
	ErrUnsupported      = errdefs.ErrUnsupported
	ErrChainBroken      = errdefs.ErrChainBroken
	ErrUnsafeBacking    = errdefs.ErrUnsafeBacking
	ErrInvalidImage     = errdefs.ErrInvalidImage
	ErrBusy             = errdefs.ErrBusy
	ErrLocked           = errdefs.ErrLocked
	ErrNoSpace          = errdefs.ErrNoSpace
	ErrDamaged          = errdefs.ErrDamaged
	ErrHypervisor       = errdefs.ErrHypervisor
	// ErrXML: a snapshot or domain XML document that does not parse.
	ErrXML = errdefs.ErrXML
	// ErrXMLDetail: well-formed XML with a wrong detail.
	ErrXMLDetail = errdefs.ErrXMLDetail
	// ErrInvalidSchema: a document the VALIDATE flag found invalid.
	ErrInvalidSchema = errdefs.ErrInvalidSchema
	// ErrDuplicateUUID: two definitions of one source claim one UUID
	// (a copied NAME.xml): libvirt refuses the second as "already
	// defined", and xlsnap uses neither, or they would share snapshots.
	ErrDuplicateUUID = errdefs.ErrDuplicateUUID
)

// ErrorNumber is libvirt's virErrorNumber.
type ErrorNumber = errdefs.Code

// The libvirt error codes xlsnap's errors map to (virterror.h).
const (
	ErrNumInternal             = errdefs.CodeInternal             // VIR_ERR_INTERNAL_ERROR
	ErrNumInvalidArg           = errdefs.CodeInvalidArg           // VIR_ERR_INVALID_ARG
	ErrNumOperationFailed      = errdefs.CodeOperationFailed      // VIR_ERR_OPERATION_FAILED
	ErrNumXML                  = errdefs.CodeXMLError             // VIR_ERR_XML_ERROR
	ErrNumXMLDetail            = errdefs.CodeXMLDetail            // VIR_ERR_XML_DETAIL
	ErrNumSystemError          = errdefs.CodeSystemError          // VIR_ERR_SYSTEM_ERROR
	ErrNumNoDomain             = errdefs.CodeNoDomain             // VIR_ERR_NO_DOMAIN
	ErrNumOperationInvalid     = errdefs.CodeOperationInvalid     // VIR_ERR_OPERATION_INVALID
	ErrNumConfigUnsupported    = errdefs.CodeConfigUnsupported    // VIR_ERR_CONFIG_UNSUPPORTED
	ErrNumOperationTimeout     = errdefs.CodeOperationTimeout     // VIR_ERR_OPERATION_TIMEOUT
	ErrNumNoDomainSnapshot     = errdefs.CodeNoDomainSnapshot     // VIR_ERR_NO_DOMAIN_SNAPSHOT
	ErrNumOperationAborted     = errdefs.CodeOperationAborted     // VIR_ERR_OPERATION_ABORTED
	ErrNumOperationUnsupported = errdefs.CodeOperationUnsupported // VIR_ERR_OPERATION_UNSUPPORTED
	ErrNumResourceBusy         = errdefs.CodeResourceBusy         // VIR_ERR_RESOURCE_BUSY
	ErrNumXMLInvalidSchema     = errdefs.CodeXMLInvalidSchema     // VIR_ERR_XML_INVALID_SCHEMA
)

// Code is the libvirt error code for err (errdefs.CodeOf): what a
// toolstack returns to its own callers unchanged. A relayed libvirt code
// wins; a cancelled call is VIR_ERR_OPERATION_ABORTED.
func Code(err error) ErrorNumber { return errdefs.CodeOf(err) }

func invalidf(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidArg}, args...)...)
}

// Package driver is xlsnap's front door, in libvirt's own terms: domain
// snapshot XML, libvirt's call names, flags and semantics, and typed
// errors that carry the libvirt error code a toolstack would return.
//
// # Errors
//
// Every error wraps one of errdefs' sentinels (re-exported here under
// the same names), so errors.Is works and Code gives libvirt's
// virErrorNumber. Each call's documentation lists the errors that are its
// own, with libvirt's code in parentheses. Besides those, every call that
// reads a domain can return:
//
//   - ErrNoDomain (VIR_ERR_NO_DOMAIN, 42): the source has no such domain;
//     ErrXML (VIR_ERR_XML_ERROR, 27) or ErrDuplicateUUID
//     (VIR_ERR_OPERATION_FAILED, 9): its definition cannot be used;
//   - ErrDamaged (9): the metadata store cannot be trusted (see
//     storage.RestoreStore);
//   - a cancelled context, which Code reports as VIR_ERR_OPERATION_ABORTED
//     (78), and an expired one, VIR_ERR_OPERATION_TIMEOUT (68);
//
// and every call that changes something can also return:
//
//   - ErrBusy (VIR_ERR_OPERATION_TIMEOUT, 68): another process holds the
//     domain, as libvirt's "cannot acquire state change lock", or a
//     ChainChanging hold outlasted the call's context (a *HeldError);
//     a call whose context ends while it waits for another process
//     returns the context's error instead;
//   - ErrPending (9): an earlier operation on the domain could not finish
//     and waits in the journal: the next call on the domain finishes or
//     undoes it (a live one through the device model while the domain
//     runs, from the images once it is shut off); what neither can,
//     Check with repair sets aside;
//   - ErrLocked (VIR_ERR_RESOURCE_BUSY, 87): a process xlsnap does not
//     control holds an image;
//   - ErrNoSpace (VIR_ERR_SYSTEM_ERROR, 38), ErrChainBroken (9),
//     ErrInvalidImage (9), ErrUnsafeBacking (VIR_ERR_CONFIG_UNSUPPORTED,
//     67): the images themselves;
//   - ErrHypervisor (9) and ErrLiveUnsupported
//     (VIR_ERR_OPERATION_UNSUPPORTED, 84) for an active domain.
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
	ErrPending          = errdefs.ErrPending
	// ErrRevertRisky: a revert libvirt refuses without FORCE.
	ErrRevertRisky = errdefs.ErrRevertRisky
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

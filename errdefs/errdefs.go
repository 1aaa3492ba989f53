// Package errdefs is xlsnap's one error vocabulary. Every other package
// wraps its failures into these sentinels with %w, so errors.Is works from
// the public API for every failure, and CodeOf gives the libvirt error
// code (virErrorNumber, virterror.h) a toolstack returns for the same
// failure. It sits at the bottom of the tree and imports nothing of
// xlsnap's; the model is containerd's errdefs.
package errdefs

import (
	"context"
	"errors"
)

// Code is libvirt's virErrorNumber (include/libvirt/virterror.h).
type Code int

// The libvirt codes xlsnap reports. Values are libvirt's, fixed by its ABI.
const (
	CodeOK                   Code = 0  // VIR_ERR_OK
	CodeInternal             Code = 1  // VIR_ERR_INTERNAL_ERROR
	CodeNoSupport            Code = 3  // VIR_ERR_NO_SUPPORT
	CodeInvalidArg           Code = 8  // VIR_ERR_INVALID_ARG
	CodeOperationFailed      Code = 9  // VIR_ERR_OPERATION_FAILED
	CodeXMLError             Code = 27 // VIR_ERR_XML_ERROR
	CodeOperationDenied      Code = 29 // VIR_ERR_OPERATION_DENIED
	CodeXMLDetail            Code = 35 // VIR_ERR_XML_DETAIL
	CodeSystemError          Code = 38 // VIR_ERR_SYSTEM_ERROR
	CodeNoDomain             Code = 42 // VIR_ERR_NO_DOMAIN
	CodeNoStorageVol         Code = 50 // VIR_ERR_NO_STORAGE_VOL
	CodeOperationInvalid     Code = 55 // VIR_ERR_OPERATION_INVALID
	CodeConfigUnsupported    Code = 67 // VIR_ERR_CONFIG_UNSUPPORTED
	CodeOperationTimeout     Code = 68 // VIR_ERR_OPERATION_TIMEOUT
	CodeInvalidSnapshot      Code = 71 // VIR_ERR_INVALID_DOMAIN_SNAPSHOT
	CodeNoDomainSnapshot     Code = 72 // VIR_ERR_NO_DOMAIN_SNAPSHOT
	CodeArgumentUnsupported  Code = 74 // VIR_ERR_ARGUMENT_UNSUPPORTED
	CodeStorageProbeFailed   Code = 75 // VIR_ERR_STORAGE_PROBE_FAILED
	CodeSnapshotRevertRisky  Code = 77 // VIR_ERR_SNAPSHOT_REVERT_RISKY
	CodeOperationAborted     Code = 78 // VIR_ERR_OPERATION_ABORTED
	CodeOperationUnsupported Code = 84 // VIR_ERR_OPERATION_UNSUPPORTED
	CodeResourceBusy         Code = 87 // VIR_ERR_RESOURCE_BUSY
	CodeXMLInvalidSchema     Code = 92 // VIR_ERR_XML_INVALID_SCHEMA
)

// Error is one sentinel of the vocabulary: a message and the libvirt code
// of every failure that wraps it. Compare with errors.Is, never by text.
type Error struct {
	msg  string
	code Code
}

func (e *Error) Error() string { return e.msg }

// LibvirtCode is the libvirt code of the failure.
func (e *Error) LibvirtCode() int { return int(e.code) }

func def(code Code, msg string) *Error { return &Error{msg: msg, code: code} }

// The vocabulary. Each comment says when it is returned; the code in
// parentheses is what libvirt reports for the same failure.
var (
	// ErrInvalidArg: a flag, name or value the call does not accept (8).
	ErrInvalidArg = def(CodeInvalidArg, "invalid argument")
	// ErrOperationFailed: the operation was tried and failed (9).
	ErrOperationFailed = def(CodeOperationFailed, "operation failed")
	// ErrInternal: a bug or a state xlsnap cannot explain (1).
	ErrInternal = def(CodeInternal, "internal error")
	// ErrNoDomain: no domain of that name or UUID (42).
	ErrNoDomain = def(CodeNoDomain, "Domain not found")
	// ErrDuplicateUUID: two definitions claim one UUID; libvirt refuses
	// the second as "already defined" (9).
	ErrDuplicateUUID = def(CodeOperationFailed, "domain already defined with this uuid")
	// ErrNoSnapshot: no snapshot of that name (72).
	ErrNoSnapshot = def(CodeNoDomainSnapshot, "Domain snapshot not found")
	// ErrSnapshotExists: a snapshot of that name exists; libvirt says
	// "operation failed" (9).
	ErrSnapshotExists = def(CodeOperationFailed, "operation failed")
	// ErrRevertRisky: a revert that could lose what the domain holds and
	// is refused without FORCE, such as to a snapshot that records no
	// domain definition to roll back to (77).
	ErrRevertRisky = def(CodeSnapshotRevertRisky, "revert requires force")
	// ErrOperationInvalid: the call is valid but not in the domain's or
	// snapshot's present state (55).
	ErrOperationInvalid = def(CodeOperationInvalid, "Requested operation is not valid")
	// ErrLiveUnsupported: the hypervisor back end cannot do this to an
	// active domain (84).
	ErrLiveUnsupported = def(CodeOperationUnsupported, "Operation not supported")
	// ErrUnsupported: a configuration xlsnap does not support, such as a
	// disk kind or a snapshot mode on a format (67).
	ErrUnsupported = def(CodeConfigUnsupported, "unsupported configuration")
	// ErrXML: a document that is not well-formed XML, or an unknown value
	// (27).
	ErrXML = def(CodeXMLError, "XML error")
	// ErrXMLDetail: well-formed XML with a wrong detail, such as a
	// snapshot name with '/' or a missing required element (35).
	ErrXMLDetail = def(CodeXMLDetail, "XML error")
	// ErrInvalidSchema: a document the VALIDATE flag checked against
	// libvirt's RelaxNG schema and found invalid (92).
	ErrInvalidSchema = def(CodeXMLInvalidSchema, "XML document failed to validate against schema")
	// ErrBusy: another operation holds the domain; libvirt's "cannot
	// acquire state change lock" (68).
	ErrBusy = def(CodeOperationTimeout, "Timed out during operation: cannot acquire state change lock")
	// ErrLocked: an image is locked by a process xlsnap does not control,
	// such as a running QEMU (87).
	ErrLocked = def(CodeResourceBusy, "resource busy")
	// ErrPending: an operation could not finish and cannot be undone; it
	// stays in the journal until Open or Repair finishes it (9).
	ErrPending = def(CodeOperationFailed, "operation pending in the journal")
	// ErrDamaged: the metadata store cannot be trusted (9).
	ErrDamaged = def(CodeOperationFailed, "metadata store is damaged")
	// ErrInvalidImage: an image whose header is malformed, corrupt, too
	// large to read or of a kind xlsnap must not interpret (9).
	ErrInvalidImage = def(CodeOperationFailed, "invalid image")
	// ErrChainBroken: an image a chain needs is missing (9).
	ErrChainBroken = def(CodeOperationFailed, "backing chain broken")
	// ErrUnsafeBacking: a backing reference xlsnap refuses to follow (67).
	ErrUnsafeBacking = def(CodeConfigUnsupported, "unsafe backing reference")
	// ErrNotFound: a file or record that should exist does not (9).
	ErrNotFound = def(CodeOperationFailed, "not found")
	// ErrNoSpace: the storage is full (38, libvirt's system error).
	ErrNoSpace = def(CodeSystemError, "no space left on device")
	// ErrHypervisor: the hypervisor (libxl, QMP, libvirt) failed a call
	// (9).
	ErrHypervisor = def(CodeOperationFailed, "hypervisor call failed")
)

// CodeOf is the libvirt code for err: the code of the outermost error in
// its tree that carries one (a libvirt error relayed, or a sentinel above),
// except that a cancelled context is VIR_ERR_OPERATION_ABORTED and an
// expired one VIR_ERR_OPERATION_TIMEOUT whatever else the tree holds;
// VIR_ERR_OK for nil; VIR_ERR_INTERNAL_ERROR when nothing carries a code.
func CodeOf(err error) Code {
	// A cancelled call is aborted whatever failed on the way out.
	switch {
	case err == nil:
		return CodeOK
	case errors.Is(err, context.Canceled):
		return CodeOperationAborted
	case errors.Is(err, context.DeadlineExceeded):
		return CodeOperationTimeout
	}
	var c interface{ LibvirtCode() int }
	if errors.As(err, &c) {
		return Code(c.LibvirtCode())
	}
	return CodeInternal
}

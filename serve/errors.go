package serve

import (
	"errors"
	"fmt"
	"strings"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/xlsnap/xlsnap/errdefs"
)

// remoteError is libvirt's remote_error (virNetMessageError), the body of
// every reply with status VIR_NET_ERROR. go-libvirt generates it
// unexported, so it is spelled here with go-libvirt's exported member
// types; the field order is the wire order.
type remoteError struct {
	Code    int32
	Domain  int32
	Message libvirt.OptString
	Level   int32
	Dom     libvirt.OptDomain
	Str1    libvirt.OptString
	Str2    libvirt.OptString
	Str3    libvirt.OptString
	Int1    int32
	Int2    int32
	Net     libvirt.OptNetwork
}

// libvirt's virErrorDomain values the server reports from
// (include/libvirt/virterror.h), and VIR_ERR_ERROR.
const (
	fromRPC            = 7
	fromRemote         = 13
	fromDomain         = 20
	fromDomainSnapshot = 35
	levelError         = 2
)

// codeRPC is VIR_ERR_RPC, which errdefs has no sentinel for: libvirt's
// answer to a call its dispatcher cannot take.
const codeRPC errdefs.Code = 39

// Error is a failure the server words as libvirt would: code, the
// virErrorDomain it comes from, and the detail that follows libvirt's
// per-code prefix. Handlers return it where libvirt's own text is known
// (lookups, read-only refusals); any other error is carried with its
// errdefs code.
type Error struct {
	Code   errdefs.Code
	Domain int32
	Detail string
}

func (e *Error) Error() string { return libvirtMessage(e.Code, e.Detail) }

// LibvirtCode makes errdefs.CodeOf read the code.
func (e *Error) LibvirtCode() int { return int(e.Code) }

// prefixes are virErrorMsgStrings' formats (src/util/virerror.c) for the
// codes xlsnap reports: libvirt sends the whole formatted message, and
// virsh prints it after "error: ".
var prefixes = map[errdefs.Code]string{
	errdefs.CodeInternal:             "internal error: ",
	errdefs.CodeNoSupport:            "this function is not supported by the connection driver: ",
	errdefs.CodeInvalidArg:           "invalid argument: ",
	errdefs.CodeOperationFailed:      "operation failed: ",
	errdefs.CodeXMLError:             "XML error: ",
	errdefs.CodeOperationDenied:      "operation forbidden: ",
	errdefs.CodeNoDomain:             "Domain not found: ",
	errdefs.CodeOperationInvalid:     "Requested operation is not valid: ",
	errdefs.CodeConfigUnsupported:    "unsupported configuration: ",
	errdefs.CodeOperationTimeout:     "Timed out during operation: ",
	errdefs.CodeInvalidSnapshot:      "Invalid domain snapshot: ",
	errdefs.CodeNoDomainSnapshot:     "Domain snapshot not found: ",
	errdefs.CodeSnapshotRevertRisky:  "revert requires force: ",
	errdefs.CodeArgumentUnsupported:  "argument unsupported: ",
	errdefs.CodeOperationAborted:     "operation aborted: ",
	errdefs.CodeOperationUnsupported: "Operation not supported: ",
	errdefs.CodeResourceBusy:         "resource busy: ",
	errdefs.CodeXMLInvalidSchema:     "XML document failed to validate against schema: ",
}

func libvirtMessage(code errdefs.Code, detail string) string {
	return prefixes[code] + detail
}

// toRemote is err in libvirt's error structure. The code is
// errdefs.CodeOf's; the message is libvirt's prefix for it and the
// error's text, less the sentinel's own words where they lead it (they
// say what the prefix says).
func toRemote(err error, domain int32) *remoteError {
	var e *Error
	if errors.As(err, &e) {
		return newRemoteError(e.Code, e.Domain, e.Error())
	}
	code := errdefs.CodeOf(err)
	detail := err.Error()
	var s *errdefs.Error
	if errors.As(err, &s) {
		if rest, ok := strings.CutPrefix(detail, s.Error()+": "); ok {
			detail = rest
		}
	}
	return newRemoteError(code, domain, libvirtMessage(code, detail))
}

func newRemoteError(code errdefs.Code, domain int32, msg string) *remoteError {
	return &remoteError{Code: int32(code), Domain: domain, Message: libvirt.OptString{msg}, Level: levelError, Int1: -1, Int2: -1}
}

// errNoSnapshot is libvirt's words for a lookup that found nothing
// (virDomainSnapshotFindByName's callers in the QEMU driver).
func errNoSnapshot(name string) *Error {
	return &Error{Code: errdefs.CodeNoDomainSnapshot, Domain: fromDomainSnapshot,
		Detail: fmt.Sprintf("no domain snapshot with matching name '%s'", name)}
}

// errNoDomain is libvirt's words for a domain lookup that found nothing,
// by the key the caller gave ("name 'web'", "uuid '…'", "id 3").
func errNoDomain(key string) *Error {
	return &Error{Code: errdefs.CodeNoDomain, Domain: fromDomain, Detail: "no domain with matching " + key}
}

// errReadOnly is virCheckReadOnlyGoto's refusal on a read-only
// connection, naming the public API as libvirt does.
func errReadOnly(api string) *Error {
	return &Error{Code: errdefs.CodeOperationDenied, Domain: fromDomain, Detail: "read only access prevents " + api}
}

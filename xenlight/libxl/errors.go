package libxl

import (
	"fmt"
	"strings"
	"syscall"

	"github.com/xlsnap/xlsnap/errdefs"
)

var (
	// ErrNoXen: libxl cannot open the hypervisor interface (libxc): this
	// is not a Xen control domain, or (errors.Is fs.ErrPermission) the
	// process may not use it. It wraps errdefs.ErrHypervisor.
	ErrNoXen = fmt.Errorf("%w: no Xen: libxl cannot open the hypervisor interface", errdefs.ErrHypervisor)
	// ErrClosed: the Hypervisor was closed; using it is an invalid
	// operation (wraps errdefs.ErrOperationInvalid).
	ErrClosed = fmt.Errorf("%w: libxl context closed", errdefs.ErrOperationInvalid)
)

// libxl's error numbers (libxl_error in _libxl_types.h), the ones this
// package tells apart.
const (
	codeFail           = -3  // ERROR_FAIL
	codeNI             = -4  // ERROR_NI
	codeInval          = -6  // ERROR_INVAL
	codeLockFail       = -15 // ERROR_LOCK_FAIL
	codeDomainNotFound = -21 // ERROR_DOMAIN_NOTFOUND
	codeFeatureRemoved = -25 // ERROR_FEATURE_REMOVED
)

// codeNames are libxl_error's names, by -code.
var codeNames = [...]string{"", "NONSPECIFIC", "VERSION", "FAIL", "NI", "NOMEM", "INVAL",
	"BADFAIL", "GUEST_TIMEDOUT", "TIMEDOUT", "NOPARAVIRT", "NOT_READY", "OSEVENT_REG_FAIL",
	"BUFFERFULL", "UNKNOWN_CHILD", "LOCK_FAIL", "JSON_CONFIG_EMPTY", "DEVICE_EXISTS",
	"CHECKPOINT_DEVOPS_DOES_NOT_MATCH", "CHECKPOINT_DEVICE_NOT_SUPPORTED", "VNUMA_CONFIG_INVALID",
	"DOMAIN_NOTFOUND", "ABORTED", "NOTFOUND", "DOMAIN_DESTROYED", "FEATURE_REMOVED",
	"PROTOCOL_ERROR_QMP", "UNKNOWN_QMP_ERROR", "QMP_GENERIC_ERROR", "QMP_COMMAND_NOT_FOUND",
	"QMP_DEVICE_NOT_ACTIVE", "QMP_DEVICE_NOT_FOUND", "QEMU_API"}

// Error is a failed libxl call. It keeps libxl's error number and what
// libxl logged at error level during the call (libxl's return codes say
// little; its log says what went wrong). errors.Is finds the errdefs
// sentinel for the code (errdefs.ErrHypervisor for a code with no closer
// word), and the errno libxl last logged.
type Error struct {
	Op    string        // what was being done: "pausing dom1"
	Code  int           // libxl_error, negative (ERROR_FAIL is -3)
	Log   []string      // libxl's error messages, oldest first
	Errno syscall.Errno // the last errno libxl logged, 0 if none

	sentinel error
}

func newError(op string, code int, log []string, errno syscall.Errno) *Error {
	e := &Error{Op: op, Code: code, Log: log, Errno: errno, sentinel: errdefs.ErrHypervisor}
	switch code {
	case codeDomainNotFound:
		e.sentinel = errdefs.ErrNoDomain
	case codeInval:
		e.sentinel = errdefs.ErrInvalidArg
	case codeNI, codeFeatureRemoved:
		e.sentinel = errdefs.ErrUnsupported
	case codeLockFail:
		e.sentinel = errdefs.ErrBusy
	}
	return e
}

// CodeName is libxl's name for the code ("DOMAIN_NOTFOUND").
func (e *Error) CodeName() string {
	if i := -e.Code; i > 0 && i < len(codeNames) {
		return codeNames[i]
	}
	return fmt.Sprintf("%d", e.Code)
}

func (e *Error) Error() string {
	msg := fmt.Sprintf("%s: libxl error %s (%d)", e.Op, e.CodeName(), e.Code)
	if len(e.Log) > 0 {
		msg += ": " + strings.Join(e.Log, "; ")
	}
	return msg
}

// LibxlCode is libxl's error number, for callers that match on it
// without this package's type.
func (e *Error) LibxlCode() int { return e.Code }

func (e *Error) Unwrap() []error {
	errs := []error{e.sentinel}
	if e.Errno != 0 {
		errs = append(errs, e.Errno)
	}
	return errs
}

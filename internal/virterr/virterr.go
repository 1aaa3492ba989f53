// Package virterr turns libvirt's errors into xlsnap's: the libvirt code
// and message stay (driver.Code reads the code), errors.Is finds xlsnap's
// sentinel and errors.As the libvirt.Error. The domain source and the
// libvirt back end both speak to libvirt and must agree on the words.
package virterr

import (
	"errors"
	"fmt"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/storage"
)

// Error is a libvirt error from one operation.
type Error struct {
	Op       string // what xlsnap was doing; "" keeps libvirt's message alone
	Err      lv.Error
	Sentinel error // nil where xlsnap has no word for the code
}

func (e *Error) Error() string {
	if e.Op == "" {
		return e.Err.Message
	}
	return e.Op + ": " + e.Err.Message
}

// LibvirtCode is the code driver.Code hands back unchanged.
func (e *Error) LibvirtCode() int { return int(e.Err.Code) }

func (e *Error) Unwrap() []error {
	if e.Sentinel == nil {
		return []error{e.Err}
	}
	return []error{e.Sentinel, e.Err}
}

// sentinels are the libvirt codes xlsnap has a word for.
var sentinels = map[lv.ErrorNumber]error{
	lv.ERR_NO_DOMAIN:             storage.ErrNoDomain,
	lv.ERR_INVALID_ARG:           storage.ErrInvalidArg,
	lv.ERR_XML_ERROR:             storage.ErrInvalidArg,
	lv.ERR_XML_DETAIL:            storage.ErrInvalidArg,
	lv.ERR_OPERATION_INVALID:     storage.ErrOperationInvalid,
	lv.ERR_NO_SUPPORT:            storage.ErrUnsupported,
	lv.ERR_OPERATION_UNSUPPORTED: storage.ErrUnsupported,
	lv.ERR_ARGUMENT_UNSUPPORTED:  storage.ErrUnsupported,
	// libvirt's "cannot acquire state change lock": someone else is
	// working on the domain.
	lv.ERR_OPERATION_TIMEOUT: storage.ErrBusy,
}

// Wrap makes err, from operation op, one of xlsnap's errors; override
// replaces the sentinel of the codes it names. An error that is not
// libvirt's is wrapped with op (returned as it is when op is "").
func Wrap(op string, err error, override map[lv.ErrorNumber]error) error {
	var le lv.Error
	if !errors.As(err, &le) {
		if op == "" {
			return err
		}
		return fmt.Errorf("%s: %w", op, err)
	}
	sentinel, ok := override[le.Code]
	if !ok {
		sentinel = sentinels[le.Code]
	}
	return &Error{Op: op, Err: le, Sentinel: sentinel}
}

// Code is the libvirt code of err, ERR_OK if err is not libvirt's.
func Code(err error) lv.ErrorNumber {
	var le lv.Error
	if errors.As(err, &le) {
		return le.Code
	}
	return lv.ERR_OK
}

// Package virterr turns libvirt's errors into xlsnap's: the libvirt code
// and message stay (errdefs.CodeOf reads the code), errors.Is finds the
// errdefs sentinel and errors.As the libvirt.Error. The domain source and the
// libvirt back end both speak to libvirt and must agree on the words.
package virterr

import (
	"errors"
	"fmt"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/errdefs"
)

// Error is a libvirt error from one operation.
type Error struct {
	Op       string // what xlsnap was doing; "" keeps libvirt's message alone
	Err      lv.Error
	Sentinel error // an errdefs sentinel
}

func (e *Error) Error() string {
	if e.Op == "" {
		return e.Err.Message
	}
	return e.Op + ": " + e.Err.Message
}

// LibvirtCode is the code errdefs.CodeOf hands back unchanged: it wins
// over the sentinel's.
func (e *Error) LibvirtCode() int { return int(e.Err.Code) }

func (e *Error) Unwrap() []error { return []error{e.Sentinel, e.Err} }

// sentinels are the libvirt codes xlsnap has a word for; any other is
// errdefs.ErrOperationFailed.
var sentinels = map[lv.ErrorNumber]error{
	lv.ERR_INTERNAL_ERROR:        errdefs.ErrInternal,
	lv.ERR_NO_DOMAIN:             errdefs.ErrNoDomain,
	lv.ERR_NO_DOMAIN_SNAPSHOT:    errdefs.ErrNoSnapshot,
	lv.ERR_INVALID_ARG:           errdefs.ErrInvalidArg,
	lv.ERR_XML_ERROR:             errdefs.ErrXML,
	lv.ERR_XML_DETAIL:            errdefs.ErrXMLDetail,
	lv.ERR_XML_INVALID_SCHEMA:    errdefs.ErrInvalidSchema,
	lv.ERR_OPERATION_INVALID:     errdefs.ErrOperationInvalid,
	lv.ERR_NO_SUPPORT:            errdefs.ErrUnsupported,
	lv.ERR_CONFIG_UNSUPPORTED:    errdefs.ErrUnsupported,
	lv.ERR_OPERATION_UNSUPPORTED: errdefs.ErrUnsupported,
	lv.ERR_ARGUMENT_UNSUPPORTED:  errdefs.ErrUnsupported,
	// libvirt's "cannot acquire state change lock": someone else is
	// working on the domain.
	lv.ERR_OPERATION_TIMEOUT: errdefs.ErrBusy,
	// A disk or image another process holds.
	lv.ERR_RESOURCE_BUSY: errdefs.ErrLocked,
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
		sentinel, ok = sentinels[le.Code]
	}
	if !ok {
		sentinel = errdefs.ErrOperationFailed
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

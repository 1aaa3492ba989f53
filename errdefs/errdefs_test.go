package errdefs

import (
	"context"
	"errors"
	"fmt"
	"testing"
)

type relayed struct{ code int }

func (r relayed) Error() string    { return "libvirt said no" }
func (r relayed) LibvirtCode() int { return r.code }

func TestCodeOf(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want Code
		name string
	}{
		{nil, CodeOK, "VIR_ERR_OK"},
		{errors.New("plain"), CodeInternal, "VIR_ERR_INTERNAL_ERROR"},
		{fmt.Errorf("deleting s1: %w", ErrNoSnapshot), CodeNoDomainSnapshot, "VIR_ERR_NO_DOMAIN_SNAPSHOT"},
		{fmt.Errorf("%w: name %q contains '/'", ErrXMLDetail, "a/b"), CodeXMLDetail, "VIR_ERR_XML_DETAIL"},
		{fmt.Errorf("%w: <bogus/>", ErrInvalidSchema), CodeXMLInvalidSchema, "VIR_ERR_XML_INVALID_SCHEMA"},
		// The outermost coded error wins: a relayed libvirt code stays.
		{fmt.Errorf("op: %w", fmt.Errorf("%w %w", relayed{43}, ErrNoDomain)), 43, "VIR_ERR_NO_NETWORK"},
		{fmt.Errorf("commit: %w: %w", ErrOperationFailed, context.Canceled), CodeOperationAborted, "VIR_ERR_OPERATION_ABORTED"},
		{fmt.Errorf("wait: %w", context.DeadlineExceeded), CodeOperationTimeout, "VIR_ERR_OPERATION_TIMEOUT"},
	} {
		got := CodeOf(tc.err)
		if got != tc.want || got.String() != tc.name {
			t.Errorf("CodeOf(%v) = %d %s, want %d %s", tc.err, got, got, tc.want, tc.name)
		}
	}
	if s := Code(200).String(); s != "VIR_ERR_200" {
		t.Errorf("unknown code named %q", s)
	}
}

// Each sentinel is distinct: errors.Is never confuses two that share a
// code or a message.
func TestSentinelsDistinct(t *testing.T) {
	all := []error{ErrInvalidArg, ErrOperationFailed, ErrInternal, ErrNoDomain, ErrDuplicateUUID,
		ErrNoSnapshot, ErrSnapshotExists, ErrOperationInvalid, ErrLiveUnsupported, ErrUnsupported,
		ErrXML, ErrXMLDetail, ErrInvalidSchema, ErrBusy, ErrLocked, ErrPending, ErrDamaged,
		ErrInvalidImage, ErrChainBroken, ErrUnsafeBacking, ErrNotFound, ErrNoSpace, ErrHypervisor, ErrRevertRisky}
	for i, a := range all {
		for j, b := range all {
			if (i == j) != errors.Is(a, b) {
				t.Errorf("errors.Is(%v, %v) = %v", a, b, i != j)
			}
		}
	}
}

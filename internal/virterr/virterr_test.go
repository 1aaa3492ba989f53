package virterr

import (
	"errors"
	"testing"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/errdefs"
)

// TestWrapRealErrors wraps what libvirt's test driver returns.
func TestWrapRealErrors(t *testing.T) {
	conn, err := lv.NewConnect("test:///default")
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, lookupErr := conn.LookupDomainByName("no-such-domain")
	_, xmlErr := conn.DomainDefineXML("<domain")
	errXML := errors.New("XML error")

	err = Wrap("looking up", lookupErr, nil)
	var le lv.Error
	var e *Error
	if !errors.Is(err, errdefs.ErrNoDomain) || !errors.As(err, &le) || !errors.As(err, &e) ||
		e.LibvirtCode() != int(lv.ERR_NO_DOMAIN) || err.Error() != "looking up: "+le.Message {
		t.Fatalf("no domain: %v", err)
	}
	if Code(err) != lv.ERR_NO_DOMAIN || Code(errors.New("x")) != lv.ERR_OK {
		t.Fatal("Code")
	}
	// An override replaces the sentinel; no op keeps libvirt's message.
	err = Wrap("", xmlErr, map[lv.ErrorNumber]error{lv.ERR_XML_DETAIL: errXML})
	if !errors.Is(err, errXML) || errors.Is(err, errdefs.ErrInvalidArg) || err.Error() != xmlErr.(lv.Error).Message {
		t.Fatalf("XML: %v (from %v)", err, xmlErr)
	}
	// Every libvirt error is one of the vocabulary's, and keeps its code.
	_, err = conn.LookupStoragePoolByName("no-such-pool")
	err = Wrap("pool", err, nil)
	if !errors.Is(err, errdefs.ErrOperationFailed) || errdefs.CodeOf(err) != errdefs.Code(lv.ERR_NO_STORAGE_POOL) {
		t.Fatalf("no pool: %v, code %v", err, errdefs.CodeOf(err))
	}
	if err := Wrap("", lookupErr, nil); errdefs.CodeOf(err) != errdefs.CodeNoDomain {
		t.Fatalf("no domain: code %v", errdefs.CodeOf(err))
	}
	plain := errors.New("plain")
	if Wrap("", plain, nil) != plain || !errors.Is(Wrap("op", plain, nil), plain) {
		t.Fatal("a non-libvirt error")
	}
}

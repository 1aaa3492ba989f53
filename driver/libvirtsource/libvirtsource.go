// Package libvirtsource is the domain source for a libvirt connection
// (any URI: xen:///system, test:///default, qemu:///session), through
// libvirt.org/go/libvirt (cgo, against Debian's libvirt-dev).
package libvirtsource

import (
	"context"
	"fmt"
	"sort"

	"libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/internal/virterr"
	xlibvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
)

// Source reads and redefines domains through one libvirt connection.
type Source struct {
	conn *libvirt.Connect
	uri  string
}

// Open connects to uri (virConnectOpen).
//
// Errors: libvirt's, relayed with its own code (driver.Code gives it).
func Open(uri string) (*Source, error) {
	conn, err := libvirt.NewConnect(uri)
	if err != nil {
		return nil, fmt.Errorf("connecting to %s: %w", uri, wrap(err))
	}
	return &Source{conn: conn, uri: uri}, nil
}

// URI is the connection's canonical URI (libvirt's own answer, so two
// spellings of one daemon are one source); the URI given if it cannot say.
func (s *Source) URI() string {
	if uri, err := s.conn.GetURI(); err == nil {
		return uri
	}
	return s.uri
}

// Conn is the connection, for callers that need more of libvirt.
func (s *Source) Conn() *libvirt.Connect { return s.conn }

// Close closes the connection (virConnectClose). Errors: libvirt's,
// with its code.
func (s *Source) Close() error {
	_, err := s.conn.Close()
	return err
}

// xmlErrors: a definition libvirt cannot parse is the driver's ErrXML.
var xmlErrors = map[libvirt.ErrorNumber]error{
	libvirt.ERR_XML_ERROR:  driver.ErrXML,
	libvirt.ERR_XML_DETAIL: driver.ErrXML,
}

func wrap(err error) error { return virterr.Wrap("", err, xmlErrors) }

// Domain reads a domain's persistent definition and its state
// (virDomainGetXMLDesc with VIR_DOMAIN_XML_INACTIVE, virDomainGetState).
//
// Errors: libvirt's, relayed with their codes (VIR_ERR_NO_DOMAIN, 42, for
// no such domain); a definition libvirt cannot parse is driver.ErrXML
// (VIR_ERR_XML_ERROR, 27).
func (s *Source) Domain(ctx context.Context, name string) (*driver.SourceDomain, error) {
	dom, err := s.conn.LookupDomainByName(name)
	if err != nil {
		return nil, wrap(err)
	}
	defer dom.Free()
	state, _, err := dom.GetState()
	if err != nil {
		return nil, wrap(err)
	}
	doc, err := dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE)
	if err != nil {
		return nil, wrap(err)
	}
	return &driver.SourceDomain{Name: name, State: driver.DomainState(xlibvirt.StateOf(state)), XML: doc}, nil
}

// Domains lists every defined and running domain's name, sorted
// (virConnectListAllDomains).
//
// Errors: libvirt's, relayed with their codes.
func (s *Source) Domains(ctx context.Context) ([]string, error) {
	doms, err := s.conn.ListAllDomains(0)
	if err != nil {
		return nil, wrap(err)
	}
	var names []string
	for _, d := range doms {
		n, err := d.GetName()
		d.Free()
		if err != nil {
			return nil, wrap(err)
		}
		names = append(names, n)
	}
	sort.Strings(names)
	return names, nil
}

// Redefine defines the new XML over the domain (virDomainDefineXML).
//
// Errors: libvirt's, relayed with their codes; a document libvirt refuses
// to parse is driver.ErrXML (27).
func (s *Source) Redefine(ctx context.Context, name, doc string) error {
	dom, err := s.conn.DomainDefineXML(doc)
	if err != nil {
		return wrap(err)
	}
	return dom.Free()
}

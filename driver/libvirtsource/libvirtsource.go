// Package libvirtsource is the domain source for a libvirt connection
// (any URI: xen:///system, test:///default, qemu:///session), through
// libvirt.org/go/libvirt (cgo, against Debian's libvirt-dev). The
// connection outlives a restart of the daemon (xenlight/libvirt's Conn):
// the call that finds it lost fails with ErrNoConnection, the next one
// connects again.
package libvirtsource

import (
	"context"
	"errors"
	"sort"

	"libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/driver"
	xlibvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
)

// Source reads and redefines domains through one libvirt connection.
type Source struct {
	c *xlibvirt.Conn
}

// Open connects to uri (virConnectOpen), with keepalive
// (xlibvirt.DefaultKeepalive: a call on a daemon that stopped answering
// fails after 35 s).
//
// Errors: libvirt's, relayed with its own code (driver.Code gives it;
// VIR_ERR_SYSTEM_ERROR, 38, for a daemon that refuses the connection).
func Open(uri string) (*Source, error) {
	c, err := xlibvirt.Dial(uri, xlibvirt.DefaultKeepalive)
	if err != nil {
		return nil, err
	}
	return New(c), nil
}

// New reads and redefines domains through c, which Close closes.
func New(c *xlibvirt.Conn) *Source { return &Source{c: c} }

// URI is the connection's canonical URI (libvirt's own answer, so two
// spellings of one daemon are one source), as it was at Open: the same
// while the daemon is down and after it restarted.
func (s *Source) URI() string { return s.c.URI() }

// Conn is the connection as it stands (perhaps lost: the Source connects
// again by itself), for callers that need more of libvirt.
func (s *Source) Conn() *libvirt.Connect { return s.c.Current() }

// Close closes the connections the Source opened (virConnectClose).
// Errors: libvirt's, with its code.
func (s *Source) Close() error { return s.c.Close() }

// call runs fn on a live connection. libvirt's calls block in C: ctx is
// checked before them, and keepalive bounds a call on a daemon that stopped
// answering. Errors: ctx's; xlibvirt.ErrNoConnection when there is no
// connection, or it is lost under fn; else fn's, relayed with libvirt's
// code (a definition libvirt cannot parse is driver.ErrXML).
func (s *Source) call(ctx context.Context, fn func(*libvirt.Connect) error) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	conn, err := s.c.Get(ctx)
	if err != nil {
		return err
	}
	if err := fn(conn); err != nil {
		return s.c.Wrap(conn, "", err, xmlErrors)
	}
	return nil
}

// xmlErrors: a definition libvirt cannot parse is the driver's ErrXML.
var xmlErrors = map[libvirt.ErrorNumber]error{
	libvirt.ERR_XML_ERROR:  driver.ErrXML,
	libvirt.ERR_XML_DETAIL: driver.ErrXML,
}

// Domain reads a domain's persistent definition and its state
// (virDomainGetXMLDesc with VIR_DOMAIN_XML_INACTIVE, virDomainGetState).
//
// Errors: libvirt's, relayed with their codes (VIR_ERR_NO_DOMAIN, 42, for
// no such domain); a definition libvirt cannot parse is driver.ErrXML
// (VIR_ERR_XML_ERROR, 27); xlibvirt.ErrNoConnection (38) without a
// connection to the daemon.
func (s *Source) Domain(ctx context.Context, name string) (*driver.SourceDomain, error) {
	var sd *driver.SourceDomain
	err := s.call(ctx, func(conn *libvirt.Connect) error {
		dom, err := conn.LookupDomainByName(name)
		if err != nil {
			return err
		}
		defer dom.Free()
		state, _, err := dom.GetState()
		if err != nil {
			return err
		}
		doc, err := dom.GetXMLDesc(libvirt.DOMAIN_XML_INACTIVE)
		if err != nil {
			return err
		}
		sd = &driver.SourceDomain{Name: name, State: driver.DomainState(xlibvirt.StateOf(state)), XML: doc}
		return nil
	})
	return sd, err
}

// Domains lists every defined and running domain's name, sorted
// (virConnectListAllDomains).
//
// Errors: libvirt's, relayed with their codes; xlibvirt.ErrNoConnection
// (38) without a connection to the daemon.
func (s *Source) Domains(ctx context.Context) ([]string, error) {
	var names []string
	err := s.call(ctx, func(conn *libvirt.Connect) error {
		doms, err := conn.ListAllDomains(0)
		if err != nil {
			return err
		}
		var errs error
		for _, d := range doms {
			n, err := d.GetName()
			d.Free()
			errs = errors.Join(errs, err)
			names = append(names, n)
		}
		return errs
	})
	if err != nil {
		return nil, err
	}
	sort.Strings(names)
	return names, nil
}

// Redefine defines the new XML over the domain (virDomainDefineXML).
//
// Errors: libvirt's, relayed with their codes; a document libvirt refuses
// to parse is driver.ErrXML (27); xlibvirt.ErrNoConnection (38) without a
// connection to the daemon, or with one lost under the call (the
// definition may then be written or not: the journal's definition step
// writes it again).
func (s *Source) Redefine(ctx context.Context, name, doc string) error {
	return s.call(ctx, func(conn *libvirt.Connect) error {
		dom, err := conn.DomainDefineXML(doc)
		if err != nil {
			return err
		}
		return dom.Free()
	})
}

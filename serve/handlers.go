package serve

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	libvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/fsutil"
	"github.com/xlsnap/xlsnap/storage"
)

// libvirt's procedure numbers (remote_protocol.x's remote_procedure, the
// ABI) for the calls served here.
const (
	procConnectOpen                     = 1
	procConnectClose                    = 2
	procConnectGetType                  = 3
	procDomainDefineXML                 = 11
	procDomainGetXMLDesc                = 14
	procDomainGetInfo                   = 16
	procDomainLookupByID                = 22
	procDomainLookupByName              = 23
	procDomainLookupByUUID              = 24
	procConnectGetHostname              = 59
	procConnectSupportsFeature          = 60
	procAuthList                        = 66
	procConnectGetURI                   = 110
	procDomainIsActive                  = 150
	procDomainIsPersistent              = 151
	procDomainSnapshotCreateXML         = 185
	procDomainSnapshotGetXMLDesc        = 186
	procDomainSnapshotNum               = 187
	procDomainSnapshotListNames         = 188
	procDomainSnapshotLookupByName      = 189
	procDomainHasCurrentSnapshot        = 190
	procDomainSnapshotCurrent           = 191
	procDomainRevertToSnapshot          = 192
	procDomainSnapshotDelete            = 193
	procDomainGetState                  = 212
	procDomainSnapshotGetParent         = 244
	procDomainSnapshotNumChildren       = 246
	procDomainSnapshotListChildrenNames = 247
	procDomainSnapshotIsCurrent         = 271
	procDomainSnapshotHasMetadata       = 272
	procConnectListAllDomains           = 273
	procDomainListAllSnapshots          = 274
	procDomainSnapshotListAllChildren   = 275
	procDomainDefineXMLFlags            = 350
)

// SnapshotProcedures are the procedures the driver answers, also in
// front of an upstream daemon.
var SnapshotProcedures = []uint32{
	procDomainSnapshotCreateXML, procDomainSnapshotGetXMLDesc, procDomainSnapshotNum,
	procDomainSnapshotListNames, procDomainSnapshotLookupByName, procDomainHasCurrentSnapshot,
	procDomainSnapshotCurrent, procDomainRevertToSnapshot, procDomainSnapshotDelete,
	procDomainSnapshotGetParent, procDomainSnapshotNumChildren, procDomainSnapshotListChildrenNames,
	procDomainSnapshotIsCurrent, procDomainSnapshotHasMetadata, procDomainListAllSnapshots,
	procDomainSnapshotListAllChildren,
}

// handler serves one procedure.
type handler struct {
	// decode reads the call's arguments and returns the call to run.
	// It runs as the packet is read, so a call whose arguments do not
	// decode condemns its connection before any later packet runs.
	decode func(body []byte) (run, error)
	// beforeOpen: the call is answered before CONNECT_OPEN, as libvirtd
	// answers the ones its client makes while connecting.
	beforeOpen bool
	// changes is the public API a read-only connection is refused
	// (virCheckReadOnlyGoto); "" for a call that only reads.
	changes string
}

// run is a call whose arguments are decoded.
type run func(ctx context.Context, c *conn) (any, error)

// with decodes the call's go-libvirt argument structure A for fn.
func with[A any](fn func(ctx context.Context, c *conn, a *A) (any, error)) func([]byte) (run, error) {
	return func(body []byte) (run, error) {
		var a A
		if err := decodeArgs(body, &a); err != nil {
			return nil, err
		}
		return func(ctx context.Context, c *conn) (any, error) { return fn(ctx, c, &a) }, nil
	}
}

// noArgs is fn for a call without arguments, refusing a body.
func noArgs(fn run) func([]byte) (run, error) {
	return func(body []byte) (run, error) {
		if len(body) != 0 {
			return nil, fmt.Errorf("%w: %d bytes of arguments to a call that takes none", ErrMalformed, len(body))
		}
		return fn, nil
	}
}

// Features a client asks with CONNECT_SUPPORTS_FEATURE
// (src/libvirt_internal.h, virDrvFeature).
const featureProgramKeepalive = 10

// connectRO is VIR_CONNECT_RO.
const connectRO = 1

// domainXMLSecure is VIR_DOMAIN_XML_SECURE: the domain XML with its
// secrets (graphics passwords), which libvirt prints only when asked and
// never to a read-only connection (virDomainGetXMLDesc).
const domainXMLSecure = 1

var handlers map[uint32]handler

func init() {
	handlers = map[uint32]handler{
		procAuthList: {beforeOpen: true, decode: noArgs(func(context.Context, *conn) (any, error) {
			// REMOTE_AUTH_NONE: the socket's permissions and the peer
			// credentials check are the authentication, as on
			// libvirtd's Unix sockets.
			return &libvirt.AuthListRet{Types: []libvirt.AuthType{0}}, nil
		})},
		procConnectSupportsFeature: {beforeOpen: true, decode: with(func(_ context.Context, _ *conn, a *libvirt.ConnectSupportsFeatureArgs) (any, error) {
			var ok int32
			if a.Feature == featureProgramKeepalive {
				ok = 1
			}
			return &libvirt.ConnectSupportsFeatureRet{Supported: ok}, nil
		})},
		procConnectOpen: {beforeOpen: true, decode: func(body []byte) (run, error) {
			a, err := decodeConnectOpen(body)
			if err != nil {
				return nil, err
			}
			return func(_ context.Context, c *conn) (any, error) {
				c.mu.Lock()
				defer c.mu.Unlock()
				c.opened = true
				if len(a.Name) > 0 {
					c.uri = a.Name[0]
				}
				if a.Flags&connectRO != 0 {
					c.readOnly = true
				}
				return nil, nil
			}, nil
		}},
		procConnectClose: {decode: noArgs(func(_ context.Context, c *conn) (any, error) {
			c.mu.Lock()
			c.opened = false
			c.mu.Unlock()
			return nil, nil
		})},
		procConnectGetType: {decode: noArgs(func(context.Context, *conn) (any, error) {
			// The libxl driver's name: xlsnap stands in for it.
			return &libvirt.ConnectGetTypeRet{Type: "Xen"}, nil
		})},
		procConnectGetURI: {decode: noArgs(func(_ context.Context, c *conn) (any, error) {
			c.mu.Lock()
			defer c.mu.Unlock()
			uri := c.uri
			if uri == "" {
				uri = "xen:///system"
			}
			return &libvirt.ConnectGetUriRet{Uri: uri}, nil
		})},
		procConnectGetHostname: {decode: noArgs(func(context.Context, *conn) (any, error) {
			h, err := os.Hostname()
			return &libvirt.ConnectGetHostnameRet{Hostname: h}, err
		})},
		procDomainLookupByName: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainLookupByNameArgs) (any, error) {
			d, err := c.s.domain(ctx, a.Name)
			if err != nil {
				return nil, err
			}
			return &libvirt.DomainLookupByNameRet{Dom: d.ref}, nil
		})},
		procDomainLookupByUUID: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainLookupByUUIDArgs) (any, error) {
			d, err := c.s.domainByUUID(ctx, a.UUID)
			if err != nil {
				return nil, err
			}
			return &libvirt.DomainLookupByUUIDRet{Dom: d.ref}, nil
		})},
		procDomainLookupByID: {decode: with(func(_ context.Context, _ *conn, a *libvirt.DomainLookupByIDArgs) (any, error) {
			// A domain source knows no domain ids.
			return nil, errNoDomain(fmt.Sprintf("id %d", a.ID))
		})},
		procConnectListAllDomains: {decode: with(func(ctx context.Context, c *conn, a *libvirt.ConnectListAllDomainsArgs) (any, error) {
			doms, err := c.s.listDomains(ctx, uint32(a.Flags))
			if err != nil {
				return nil, err
			}
			ret := &libvirt.ConnectListAllDomainsRet{Ret: uint32(len(doms))}
			if a.NeedResults != 0 {
				for _, d := range doms {
					ret.Domains = append(ret.Domains, d.ref)
				}
			}
			return ret, nil
		})},
		procDomainGetState: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainGetStateArgs) (any, error) {
			if a.Flags != 0 {
				return nil, &Error{Code: errdefs.CodeInvalidArg, Domain: fromDomain, Detail: fmt.Sprintf("unsupported flags (0x%x) in function virDomainGetState", a.Flags)}
			}
			d, err := c.s.domain(ctx, a.Dom.Name)
			if err != nil {
				return nil, err
			}
			return &libvirt.DomainGetStateRet{State: d.state}, nil
		})},
		procDomainGetInfo: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainGetInfoArgs) (any, error) {
			d, err := c.s.domain(ctx, a.Dom.Name)
			if err != nil {
				return nil, err
			}
			return &libvirt.DomainGetInfoRet{State: uint8(d.state), MaxMem: d.maxMemKiB, Memory: d.memKiB, NrVirtCPU: d.vcpus}, nil
		})},
		procDomainIsActive: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainIsActiveArgs) (any, error) {
			d, err := c.s.domain(ctx, a.Dom.Name)
			if err != nil {
				return nil, err
			}
			var active int32
			if d.state != stateShutoff {
				active = 1
			}
			return &libvirt.DomainIsActiveRet{Active: active}, nil
		})},
		procDomainIsPersistent: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainIsPersistentArgs) (any, error) {
			if _, err := c.s.domain(ctx, a.Dom.Name); err != nil {
				return nil, err
			}
			// Every domain of a source has a persistent definition.
			return &libvirt.DomainIsPersistentRet{Persistent: 1}, nil
		})},
		procDomainGetXMLDesc: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainGetXMLDescArgs) (any, error) {
			secure := a.Flags&domainXMLSecure != 0
			if secure && c.isReadOnly() {
				return nil, &Error{Code: errdefs.CodeOperationDenied, Domain: fromDomain, Detail: "virDomainGetXMLDesc with secure flag"}
			}
			d, err := c.s.domain(ctx, a.Dom.Name)
			if err != nil {
				return nil, err
			}
			if secure {
				return &libvirt.DomainGetXMLDescRet{XML: d.xml}, nil
			}
			x, err := driver.HideSecrets(d.xml)
			if err != nil {
				return nil, err
			}
			return &libvirt.DomainGetXMLDescRet{XML: x}, nil
		})},
		procDomainDefineXML: {changes: "virDomainDefineXML", decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainDefineXMLArgs) (any, error) {
			ref, err := c.s.define(ctx, a.XML)
			return &libvirt.DomainDefineXMLRet{Dom: ref}, err
		})},
		procDomainDefineXMLFlags: {changes: "virDomainDefineXMLFlags", decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainDefineXMLFlagsArgs) (any, error) {
			// VIR_DOMAIN_DEFINE_VALIDATE (1) is the one flag libvirt has;
			// the definition is parsed in full either way.
			if a.Flags&^1 != 0 {
				return nil, &Error{Code: errdefs.CodeInvalidArg, Domain: fromDomain, Detail: fmt.Sprintf("unsupported flags (0x%x) in function virDomainDefineXMLFlags", uint32(a.Flags)&^1)}
			}
			ref, err := c.s.define(ctx, a.XML)
			return &libvirt.DomainDefineXMLFlagsRet{Dom: ref}, err
		})},
	}
	for proc, h := range snapshotHandlers() {
		handlers[proc] = h
	}
}

// libvirt's virDomainState values this server reports.
const (
	stateRunning = 1
	statePaused  = 3
	stateShutoff = 5
)

// domInfo is what the domain calls answer about one domain.
type domInfo struct {
	ref       libvirt.Domain
	xml       string
	state     int32
	maxMemKiB uint64
	memKiB    uint64
	vcpus     uint16
}

// domain reads one domain from the source.
func (s *Server) domain(ctx context.Context, name string) (*domInfo, error) {
	sd, err := s.cfg.Source.Domain(ctx, name)
	if errors.Is(err, errdefs.ErrNoDomain) {
		return nil, errNoDomain(fmt.Sprintf("name '%s'", name))
	}
	if err != nil {
		return nil, err
	}
	var def libvirtxml.Domain
	if err := def.Unmarshal(sd.XML); err != nil {
		return nil, fmt.Errorf("%w: domain %s: %w", errdefs.ErrXML, name, err)
	}
	d := &domInfo{ref: libvirt.Domain{Name: sd.Name, ID: -1}, xml: sd.XML, state: stateOf(sd.State)}
	if def.UUID != "" {
		u, err := parseUUID(def.UUID)
		if err != nil {
			return nil, fmt.Errorf("%w: domain %s: %w", errdefs.ErrXML, name, err)
		}
		d.ref.UUID = u
	}
	if s.cfg.Hypervisor != nil {
		st, err := s.cfg.Hypervisor.State(ctx, name)
		if err != nil {
			return nil, err
		}
		d.state = stateOf(driver.DomainState(st))
	}
	if def.Memory != nil {
		d.maxMemKiB = toKiB(def.Memory.Value, def.Memory.Unit)
		d.memKiB = d.maxMemKiB
	}
	if def.CurrentMemory != nil {
		d.memKiB = toKiB(def.CurrentMemory.Value, def.CurrentMemory.Unit)
	}
	d.vcpus = 1
	if def.VCPU != nil {
		d.vcpus = uint16(def.VCPU.Value)
	}
	return d, nil
}

func stateOf(st driver.DomainState) int32 {
	switch st {
	case driver.StateRunning:
		return stateRunning
	case driver.StatePaused:
		return statePaused
	}
	return stateShutoff
}

// toKiB converts a libvirt memory amount (default unit KiB) to KiB.
func toKiB(v uint, unit string) uint64 {
	shift := map[string]uint{"b": 0, "bytes": 0, "k": 10, "KiB": 10, "": 10, "M": 20, "MiB": 20, "G": 30, "GiB": 30, "T": 40, "TiB": 40}
	if sh, ok := shift[unit]; ok {
		return uint64(v) << sh >> 10
	}
	return uint64(v)
}

func parseUUID(s string) (libvirt.UUID, error) {
	var u libvirt.UUID
	b, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(b) != len(u) {
		return u, fmt.Errorf("malformed uuid %q", s)
	}
	copy(u[:], b)
	return u, nil
}

// domainByUUID finds the source's domain with uuid u.
func (s *Server) domainByUUID(ctx context.Context, u libvirt.UUID) (*domInfo, error) {
	doms, err := s.listDomains(ctx, 0)
	if err != nil {
		return nil, err
	}
	for _, d := range doms {
		if d.ref.UUID == u {
			return d, nil
		}
	}
	return nil, errNoDomain(fmt.Sprintf("uuid '%s'", formatUUID(u)))
}

// formatUUID is u as libvirt prints it (virUUIDFormat).
func formatUUID(u libvirt.UUID) string {
	h := hex.EncodeToString(u[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// virConnectListAllDomainsFlags (libvirt-domain.h): pairs of filters, each
// pair passing every domain when neither or both bits are set.
const (
	listActive        = 1 << 0
	listInactive      = 1 << 1
	listPersistent    = 1 << 2
	listTransient     = 1 << 3
	listRunning       = 1 << 4
	listPaused        = 1 << 5
	listShutoff       = 1 << 6
	listOther         = 1 << 7
	listManagedSave   = 1 << 8
	listNoManagedSave = 1 << 9
	listAutostart     = 1 << 10
	listNoAutostart   = 1 << 11
	listHasSnapshot   = 1 << 12
	listNoSnapshot    = 1 << 13
	listHasCheckpoint = 1 << 14
	listNoCheckpoint  = 1 << 15
	listKnown         = 1<<16 - 1
)

// listDomains is CONNECT_LIST_ALL_DOMAINS over the source.
func (s *Server) listDomains(ctx context.Context, flags uint32) ([]*domInfo, error) {
	if flags&^listKnown != 0 {
		return nil, &Error{Code: errdefs.CodeInvalidArg, Domain: fromDomain, Detail: fmt.Sprintf("unsupported flags (0x%x) in function virConnectListAllDomains", flags&^listKnown)}
	}
	names, err := s.cfg.Source.Domains(ctx)
	if err != nil {
		return nil, err
	}
	// pair is one filter pair: a domain passes when neither bit is set,
	// or the bit for what it is.
	pair := func(yes, no uint32, is bool) bool {
		if flags&(yes|no) == 0 || flags&(yes|no) == yes|no {
			return true
		}
		return flags&yes != 0 && is || flags&no != 0 && !is
	}
	var out []*domInfo
	for _, n := range names {
		d, err := s.domain(ctx, n)
		if errdefs.CodeOf(err) == errdefs.CodeNoDomain {
			continue // removed since it was listed (s.domain words it as libvirt)
		}
		if err != nil {
			return nil, err
		}
		active := d.state != stateShutoff
		if !pair(listActive, listInactive, active) || !pair(listPersistent, listTransient, true) ||
			!pair(listManagedSave, listNoManagedSave, false) || !pair(listAutostart, listNoAutostart, false) ||
			!pair(listHasCheckpoint, listNoCheckpoint, false) {
			continue
		}
		if st := flags & (listRunning | listPaused | listShutoff | listOther); st != 0 {
			if !(st&listRunning != 0 && d.state == stateRunning || st&listPaused != 0 && d.state == statePaused ||
				st&listShutoff != 0 && d.state == stateShutoff) {
				continue
			}
		}
		if flags&(listHasSnapshot|listNoSnapshot) != 0 {
			snaps, err := s.cfg.Driver.ListAllSnapshots(ctx, n, 0)
			if err != nil {
				return nil, err
			}
			if !pair(listHasSnapshot, listNoSnapshot, len(snaps) > 0) {
				continue
			}
		}
		out = append(out, d)
	}
	return out, nil
}

// folderSource is a source whose new domains are files in one folder:
// the driver's DirSource.
type folderSource interface {
	Dir() string
}

// define is virDomainDefineXML: an existing domain's definition is
// replaced through the source; a new one is written as NAME.xml when the
// source is a folder. As libvirt (virDomainObjListAddLocked), a document
// whose UUID another domain has, or whose name a domain of another UUID
// has, is refused before anything is written: a second definition of one
// UUID would make every later call fail, and a new UUID under an old
// name would orphan that domain's snapshots.
func (s *Server) define(ctx context.Context, doc string) (libvirt.Domain, error) {
	var def libvirtxml.Domain
	if err := def.Unmarshal(doc); err != nil {
		return libvirt.Domain{}, &Error{Code: errdefs.CodeXMLError, Domain: fromDomain, Detail: err.Error()}
	}
	if def.Name == "" {
		return libvirt.Domain{}, &Error{Code: errdefs.CodeXMLError, Domain: fromDomain, Detail: "missing name information"}
	}
	var uuid libvirt.UUID
	if def.UUID != "" {
		var err error
		if uuid, err = parseUUID(def.UUID); err != nil {
			return libvirt.Domain{}, &Error{Code: errdefs.CodeXMLError, Domain: fromDomain, Detail: err.Error()}
		}
	}
	// Two defines at once would each pass the checks before the other
	// writes.
	s.defineMu.Lock()
	defer s.defineMu.Unlock()
	if def.UUID != "" {
		if other, err := s.domainByUUID(ctx, uuid); err == nil && other.ref.Name != def.Name {
			return libvirt.Domain{}, &Error{Code: errdefs.CodeOperationFailed, Domain: fromDomain,
				Detail: fmt.Sprintf("domain '%s' is already defined with uuid %s", other.ref.Name, formatUUID(uuid))}
		} else if err != nil && errdefs.CodeOf(err) != errdefs.CodeNoDomain {
			return libvirt.Domain{}, err
		}
	}
	old, err := s.domain(ctx, def.Name)
	switch {
	case err == nil:
		// A document without a UUID keeps the domain's, as xlsnap's
		// folder definitions may have none.
		if def.UUID != "" && old.ref.UUID != (libvirt.UUID{}) && old.ref.UUID != uuid {
			return libvirt.Domain{}, &Error{Code: errdefs.CodeOperationFailed, Domain: fromDomain,
				Detail: fmt.Sprintf("domain '%s' already exists with uuid %s", def.Name, formatUUID(old.ref.UUID))}
		}
		err = s.cfg.Source.Redefine(ctx, def.Name, doc)
	case errdefs.CodeOf(err) == errdefs.CodeNoDomain:
		err = s.defineNew(ctx, def.Name, doc)
	}
	if err != nil {
		return libvirt.Domain{}, err
	}
	d, err := s.domain(ctx, def.Name)
	if err != nil {
		return libvirt.Domain{}, err
	}
	return d.ref, nil
}

// defineNew writes a new domain's definition into a folder source, with
// the mode of the folder's other definitions (the user's choice for
// them: who may read a definition is who may read its neighbours), and
// owner-only, as libvirtd keeps its definitions, in a folder without
// any.
func (s *Server) defineNew(ctx context.Context, name, doc string) error {
	fs, ok := s.cfg.Source.(folderSource)
	if !ok {
		return &Error{Code: errdefs.CodeOperationUnsupported, Domain: fromDomain, Detail: "defining a new domain through xlsnap needs a folder source"}
	}
	if err := storage.ValidName("domain", name); err != nil {
		return err
	}
	mode := os.FileMode(0o600)
	names, err := s.cfg.Source.Domains(ctx)
	if err != nil {
		return err
	}
	for _, n := range names {
		if fi, err := os.Stat(filepath.Join(fs.Dir(), n+".xml")); err == nil {
			mode = fi.Mode().Perm()
			break
		}
	}
	return fsutil.WriteFile(filepath.Join(fs.Dir(), name+".xml"), []byte(doc), func(f *os.File) error { return f.Chmod(mode) })
}

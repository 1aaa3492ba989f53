package driver

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/storage"
)

// definitions is storage's view of the domain source (storage.Definitions):
// every definition's disks, so an image's users are found across all
// domains, and the definition step of each operation.
type definitions struct {
	src DomainSource
}

// key is the storage key of a domain definition.
func (s definitions) key(name, uuid string) string {
	return storage.DomainKey(s.src.URI(), uuid, name)
}

// DefinedDisks lists every file disk of every domain the source defines.
// A definition that cannot be read is an error: it might name the image
// an operation is about to change.
func (s definitions) DefinedDisks(ctx context.Context) ([]storage.DefinedDisk, error) {
	names, err := s.src.Domains(ctx)
	if err != nil {
		return nil, err
	}
	var out []storage.DefinedDisk
	for _, n := range names {
		sd, err := s.src.Domain(ctx, n)
		if errors.Is(err, ErrNoDomain) {
			continue // undefined since it was listed: it uses nothing now
		}
		if err != nil {
			return nil, fmt.Errorf("domain %s: %w", n, err)
		}
		def, err := parseDomain(sd.XML)
		if err != nil {
			return nil, fmt.Errorf("domain %s: %w", n, err)
		}
		// Every source counts, whatever the device: a cdrom or a block
		// disk naming an image reads it as surely as a disk does.
		if def.Devices == nil {
			continue
		}
		for _, disk := range def.Devices.Disks {
			if disk.Source == nil {
				continue
			}
			path := ""
			switch {
			case disk.Source.File != nil:
				path = disk.Source.File.File
			case disk.Source.Block != nil:
				path = disk.Source.Block.Dev
			}
			if path == "" {
				continue
			}
			abs, err := filepath.Abs(path)
			if err != nil {
				return nil, err
			}
			dd := storage.DefinedDisk{Domain: s.key(n, def.UUID), DomainName: n, Path: abs, Format: "raw"}
			if disk.Target != nil {
				dd.Target = disk.Target.Dev
			}
			if disk.Driver != nil && disk.Driver.Type != "" {
				dd.Format = disk.Driver.Type
			}
			out = append(out, dd)
		}
	}
	return out, nil
}

// Redefine is an operation's definition step: the definition (base, or
// the current one) with each disk pointed at its active image, written
// only when it differs from what the source holds.
func (s definitions) Redefine(ctx context.Context, key, name, base string, disks []storage.Disk) error {
	cur, err := s.byKey(ctx, key, name)
	if err != nil || cur == nil {
		return err // nil, nil: undefined since, no definition names anything
	}
	name = cur.Name
	doc := base
	if doc == "" {
		doc = cur.XML
	}
	def, err := parseDomain(doc)
	if err != nil {
		return err
	}
	// A snapshot's definition is of this domain (its UUID), perhaps under
	// an older name: the definition keeps the name it has now.
	def.Name = name
	want := map[string]diskInfo{}
	for _, d := range disks {
		want[d.Target] = diskInfo{Target: d.Target, Path: d.Active, Format: d.Format}
	}
	if base == "" && !repointNeeded(def, want) {
		return nil
	}
	repointDisks(def, want)
	out, err := marshalDomain(def)
	if err != nil {
		return err
	}
	if out == cur.XML {
		return nil
	}
	if err := s.src.Redefine(ctx, name, out); err != nil {
		return fmt.Errorf("rewriting the definition of %s: %w", name, err)
	}
	return nil
}

// byKey finds the definition of the domain with key: under name, or,
// renamed since, under whatever name the source has it now (nil when the
// source no longer has it).
func (s definitions) byKey(ctx context.Context, key, name string) (*SourceDomain, error) {
	match := func(n string) (*SourceDomain, error) {
		sd, err := s.src.Domain(ctx, n)
		if errors.Is(err, ErrNoDomain) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		def, err := parseDomain(sd.XML)
		if err != nil {
			return nil, err
		}
		if s.key(n, def.UUID) != key {
			return nil, nil
		}
		return sd, nil
	}
	if sd, err := match(name); sd != nil || err != nil {
		return sd, err
	}
	names, err := s.src.Domains(ctx)
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		if n == name {
			continue
		}
		if sd, err := match(n); sd != nil || err != nil && !errors.Is(err, ErrXML) && !errors.Is(err, ErrDuplicateUUID) {
			return sd, err
		}
	}
	return nil, nil
}

// repointNeeded reports whether any listed disk of def names another
// image or format than want says.
func repointNeeded(def *libvirtxml.Domain, want map[string]diskInfo) bool {
	for _, di := range fileDisks(def) {
		w, ok := want[di.Target]
		if !ok {
			continue
		}
		if abs, _ := filepath.Abs(di.Path); abs != w.Path || di.Format != w.Format {
			return true
		}
	}
	return false
}

// DomainKey is the key storage keeps a domain's records under (its UUID
// within the source; storage.DomainKey), for callers that read storage's
// records or events directly.
//
// Errors: ErrNoDomain (VIR_ERR_NO_DOMAIN, 42); ErrXML (VIR_ERR_XML_ERROR,
// 27) for a definition that does not parse.
func (d *Driver) DomainKey(ctx context.Context, domain string) (string, error) {
	_, _, key, err := d.readDefinition(ctx, domain)
	return key, err
}

// readDefinition reads a domain's definition from the source: as the
// source gives it, parsed, and its storage key.
func (d *Driver) readDefinition(ctx context.Context, domain string) (*SourceDomain, *libvirtxml.Domain, string, error) {
	sd, err := d.src.Domain(ctx, domain)
	if err != nil {
		return nil, nil, "", err
	}
	def, err := parseDomain(sd.XML)
	if err != nil {
		return nil, nil, "", err
	}
	return sd, def, d.defs.key(domain, def.UUID), nil
}

// Pending describes the operations the journal holds for a domain (one
// line each; none when it has no record yet).
//
// Errors: ErrNoDomain (VIR_ERR_NO_DOMAIN, 42); ErrXML (27) for a
// definition that does not parse; ErrDamaged (9).
func (d *Driver) Pending(ctx context.Context, domain string) ([]string, error) {
	_, _, key, err := d.readDefinition(ctx, domain)
	if err != nil {
		return nil, err
	}
	return d.st.Pending(ctx, key)
}

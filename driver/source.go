package driver

import (
	"context"
	"encoding/xml"
	"fmt"
	"path/filepath"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/internal/domxml"
)

// DomainState is a domain's state in libvirt's words.
type DomainState string

const (
	StateShutoff DomainState = "shutoff"
	StateRunning DomainState = "running"
	StatePaused  DomainState = "paused"
)

// Active reports a running or paused domain.
func (s DomainState) Active() bool { return s == StateRunning || s == StatePaused }

// SourceDomain is what a domain source knows of one domain.
type SourceDomain struct {
	Name  string
	State DomainState
	// XML is the persistent (inactive) definition.
	XML string
}

// DomainSource is where domains come from: the driver needs to read a
// definition and to replace it when it repoints disks.
type DomainSource interface {
	Domain(ctx context.Context, name string) (*SourceDomain, error)
	Domains(ctx context.Context) ([]string, error)
	// Redefine replaces the persistent definition of an existing domain.
	Redefine(ctx context.Context, name, xml string) error
	// URI names the source (file:///DIR, a libvirt URI): a domain is its
	// UUID within its source.
	URI() string
}

// diskInfo is one snapshot-capable disk of a definition.
type diskInfo struct {
	Target   string
	Path     string
	Format   string
	Snapshot string // the disk's own snapshot="..." default
}

// parseDomain reads a domain definition.
func parseDomain(doc string) (*libvirtxml.Domain, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return nil, fmt.Errorf("%w: domain XML: %w", ErrXML, err)
	}
	if err := checkTargets(&d); err != nil {
		return nil, err
	}
	return &d, nil
}

// checkTargets refuses two disks with one target: a disk is known by its
// target, and the second would be repointed at the first one's image.
// libvirt refuses such a definition with VIR_ERR_XML_ERROR.
func checkTargets(d *libvirtxml.Domain) error {
	if d.Devices == nil {
		return nil
	}
	seen := map[string]int{}
	written := map[string]int{}
	for i, disk := range d.Devices.Disks {
		if disk.Target == nil || disk.Target.Dev == "" {
			continue
		}
		if j, dup := seen[disk.Target.Dev]; dup {
			return fmt.Errorf("%w: domain %s: target %q duplicated for disk sources %q and %q", ErrXML,
				d.Name, disk.Target.Dev, diskSource(&d.Devices.Disks[j]), diskSource(&d.Devices.Disks[i]))
		}
		seen[disk.Target.Dev] = i
		// Two writable disks on one file: each would overwrite what the
		// other wrote, and a snapshot of one would freeze the other's.
		if src := diskSource(&d.Devices.Disks[i]); src != "" && (disk.Device == "" || disk.Device == "disk") && disk.ReadOnly == nil && disk.Shareable == nil {
			if j, dup := written[filepath.Clean(src)]; dup {
				return fmt.Errorf("%w: domain %s: disks %q and %q both write %s", ErrXML,
					d.Name, d.Devices.Disks[j].Target.Dev, disk.Target.Dev, src)
			}
			written[filepath.Clean(src)] = i
		}
	}
	return nil
}

// diskSource names a disk's source for a message.
func diskSource(disk *libvirtxml.DomainDisk) string {
	switch s := disk.Source; {
	case s == nil:
		return ""
	case s.File != nil:
		return s.File.File
	case s.Block != nil:
		return s.Block.Dev
	case s.Network != nil:
		return s.Network.Protocol + ":" + s.Network.Name
	}
	return sourceKind(disk.Source)
}

// fileDisks lists a definition's file-backed disks (not cdroms or
// floppies): the disks snapshots are taken of.
func fileDisks(d *libvirtxml.Domain) []diskInfo {
	var out []diskInfo
	for _, disk := range domxml.Disks(d) {
		if disk.File != "" {
			out = append(out, diskInfo{Target: disk.Target, Path: disk.File, Format: disk.Format, Snapshot: disk.Snapshot})
		}
	}
	return out
}

// repointDisks sets the source file and format of the named disks.
func repointDisks(d *libvirtxml.Domain, files map[string]diskInfo) {
	if d.Devices == nil {
		return
	}
	for i := range d.Devices.Disks {
		disk := &d.Devices.Disks[i]
		if disk.Target == nil || disk.Source == nil || disk.Source.File == nil {
			continue
		}
		want, ok := files[disk.Target.Dev]
		if !ok {
			continue
		}
		disk.Source.File.File = want.Path
		if disk.Driver == nil {
			disk.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
		}
		disk.Driver.Type = want.Format
	}
}

// marshalDomain renders a definition with an XML header-free, indented
// body, as libvirt prints it.
func marshalDomain(d *libvirtxml.Domain) (string, error) {
	out, err := xml.MarshalIndent(d, "", "  ")
	if err != nil {
		return "", err
	}
	return string(out) + "\n", nil
}

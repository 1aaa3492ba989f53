// Package domxml reads what xlsnap needs of libvirt domain XML: the
// disks snapshots are taken of. The driver and the libxl back end both
// read them, and must agree on which disks those are.
package domxml

import (
	"encoding/xml"

	"libvirt.org/go/libvirtxml"
)

// Disk is one disk of a definition: device "disk" (not a cdrom or a
// floppy), with a target and a source.
type Disk struct {
	Target   string
	File     string // the source file; "" for another kind of source
	Block    string // the source device of a block disk
	Format   string // the driver type: qcow2, raw; DefaultFormat when unset
	Snapshot string // the disk's own snapshot="..." default
}

// DefaultFormat is the format of a local disk whose definition names
// none: raw, never probed from the image's header.
const DefaultFormat = "raw"

// Disks lists a definition's disks in document order.
func Disks(d *libvirtxml.Domain) []Disk {
	if d == nil || d.Devices == nil {
		return nil
	}
	var out []Disk
	for _, disk := range d.Devices.Disks {
		if (disk.Device != "" && disk.Device != "disk") || disk.Source == nil || disk.Target == nil {
			continue
		}
		di := Disk{Target: disk.Target.Dev, Snapshot: disk.Snapshot}
		if disk.Source.File != nil {
			di.File = disk.Source.File.File
		}
		if disk.Source.Block != nil {
			di.Block = disk.Source.Block.Dev
		}
		if disk.Driver != nil {
			di.Format = disk.Driver.Type
		}
		if di.Format == "" && (di.File != "" || di.Block != "") {
			// libvirt's default for a local disk it is not allowed to
			// probe: the guest's bytes never choose how the host reads them.
			di.Format = DefaultFormat
		}
		out = append(out, di)
	}
	return out
}

// MoveSources rewrites a definition's file sources (disks' and their
// <backingStore> chains') that name a key of moves to its value, and
// reports whether any did. A definition naming no moved file comes back
// unchanged, byte for byte; one that did is re-rendered (indented, no
// XML header, as libvirt prints it). Errors: the document's parse error.
func MoveSources(doc string, moves map[string]string) (string, bool, error) {
	if doc == "" || len(moves) == 0 {
		return doc, false, nil
	}
	var d libvirtxml.Domain
	if err := d.Unmarshal(doc); err != nil {
		return doc, false, err
	}
	if d.Devices == nil {
		return doc, false, nil
	}
	changed := false
	move := func(src *libvirtxml.DomainDiskSource) {
		if src == nil || src.File == nil {
			return
		}
		if n, ok := moves[src.File.File]; ok {
			src.File.File, changed = n, true
		}
	}
	for i := range d.Devices.Disks {
		disk := &d.Devices.Disks[i]
		move(disk.Source)
		for bs := disk.BackingStore; bs != nil; bs = bs.BackingStore {
			move(bs.Source)
		}
	}
	if !changed {
		return doc, false, nil
	}
	out, err := xml.MarshalIndent(&d, "", "  ")
	if err != nil {
		return doc, false, err
	}
	return string(out) + "\n", true, nil
}

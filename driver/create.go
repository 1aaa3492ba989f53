package driver

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/storage"
)

// SnapshotRequest is the typed form of a snapshot request (the libxl
// snapshot API's shape): it takes the same path as SnapshotCreateXML.
type SnapshotRequest struct {
	Name        string
	Description string
	// Memory asks for the domain's memory to be saved to MemoryPath.
	Memory     bool
	MemoryPath string
	// Disks not listed take the default mode (see SnapshotCreateXML).
	Disks []DiskRequest
}

// DiskRequest is one disk's part in a SnapshotRequest.
type DiskRequest struct {
	// Name is the disk's target (xvda) or its source path.
	Name string
	// Skip leaves the disk out of the snapshot (snapshot="no").
	Skip bool
	// External puts the snapshot in a new overlay (ExternalPath, in
	// ExternalFormat); otherwise it is internal to the qcow2 image.
	External       bool
	ExternalFormat string
	ExternalPath   string
}

// CreateSnapshot is SnapshotCreateXML for a typed request.
func (d *Driver) CreateSnapshot(ctx context.Context, domain string, req SnapshotRequest, flags CreateFlags) (*Snapshot, error) {
	doc := &libvirtxml.DomainSnapshot{Name: req.Name, Description: req.Description}
	if req.Memory {
		doc.Memory = &libvirtxml.DomainSnapshotMemory{Snapshot: "external", File: req.MemoryPath}
	}
	if len(req.Disks) > 0 {
		doc.Disks = &libvirtxml.DomainSnapshotDisks{}
	}
	for _, dr := range req.Disks {
		sd := libvirtxml.DomainSnapshotDisk{Name: dr.Name, Snapshot: "internal"}
		switch {
		case dr.Skip:
			sd.Snapshot = "no"
		case dr.External:
			sd.Snapshot = "external"
			if dr.ExternalFormat != "" {
				sd.Driver = &libvirtxml.DomainDiskDriver{Type: dr.ExternalFormat}
			}
			if dr.ExternalPath != "" {
				sd.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: dr.ExternalPath}}
			}
		}
		doc.Disks.Disks = append(doc.Disks.Disks, sd)
	}
	return d.create(ctx, domain, doc, flags)
}

// SnapshotCreateXML takes a snapshot described by libvirt's domain
// snapshot XML, with libvirt's defaults: the name is the current time in
// seconds; a disk's mode comes from the XML, else the disk's own
// snapshot="..." attribute, else external with DISK_ONLY and internal
// without; an external overlay goes next to the image, named after the
// snapshot, in qcow2. The new snapshot becomes current.
func (d *Driver) SnapshotCreateXML(ctx context.Context, domain, xmlDesc string, flags CreateFlags) (*Snapshot, error) {
	doc, err := parseSnapshot(xmlDesc)
	if err != nil {
		return nil, err
	}
	return d.create(ctx, domain, doc, flags)
}

// MaxSnapshotXML bounds a snapshot XML document: a real one is a few
// KiB even with the domain definition inside.
const MaxSnapshotXML = 4 << 20

// parseSnapshot reads a snapshot XML document: one root element, nothing
// but whitespace and comments after it, at most MaxSnapshotXML bytes.
func parseSnapshot(xmlDesc string) (*libvirtxml.DomainSnapshot, error) {
	if len(xmlDesc) > MaxSnapshotXML {
		return nil, fmt.Errorf("%w: snapshot XML of %d bytes (at most %d)", ErrXML, len(xmlDesc), MaxSnapshotXML)
	}
	dec := xml.NewDecoder(strings.NewReader(xmlDesc))
	var doc libvirtxml.DomainSnapshot
	if err := dec.Decode(&doc); err != nil {
		return nil, fmt.Errorf("%w: snapshot XML: %w", ErrXML, err)
	}
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("%w: snapshot XML after the root element: %w", ErrXML, err)
		}
		switch t := tok.(type) {
		case xml.Comment:
			continue
		case xml.CharData:
			if len(bytes.TrimSpace(t)) == 0 {
				continue
			}
		}
		return nil, fmt.Errorf("%w: snapshot XML: content after the root element (at byte %d)", ErrXML, dec.InputOffset())
	}
	return &doc, nil
}

// checkSnapshotDisks refuses a disk whose snapshot source is not a local
// file: a block device or a network volume would otherwise be replaced by
// a qcow2 file of the same name. libvirt's qemu driver reports external
// inactive snapshots on such disks as VIR_ERR_CONFIG_UNSUPPORTED.
func checkSnapshotDisks(doc *libvirtxml.DomainSnapshot) error {
	if doc.Disks == nil {
		return nil
	}
	for _, sd := range doc.Disks.Disks {
		if sd.Source == nil || sd.Source.File != nil {
			continue
		}
		kind := sourceKind(sd.Source)
		if kind == "unknown" {
			// libvirt's parser refuses a type it does not know.
			return fmt.Errorf("%w: disk %s: unknown disk type", ErrXML, sd.Name)
		}
		return fmt.Errorf("%w: disk %s: snapshot to a %s source (only local files)", ErrUnsupported, sd.Name, kind)
	}
	return nil
}

// sourceKind names a disk source's kind as libvirt's type attribute does.
func sourceKind(s *libvirtxml.DomainDiskSource) string {
	switch {
	case s.Block != nil:
		return "block"
	case s.Network != nil:
		return "network"
	case s.Dir != nil:
		return "dir"
	case s.Volume != nil:
		return "volume"
	case s.NVME != nil:
		return "nvme"
	case s.VHostUser != nil:
		return "vhostuser"
	case s.VHostVDPA != nil:
		return "vhostvdpa"
	}
	return "unknown"
}

func (d *Driver) create(ctx context.Context, domain string, doc *libvirtxml.DomainSnapshot, flags CreateFlags) (*Snapshot, error) {
	defer d.lock(domain)()
	if flags&CreateQuiesce != 0 {
		return nil, fmt.Errorf("%w: QUIESCE needs a guest agent, which xlsnap does not drive", ErrUnsupported)
	}
	if flags&CreateCurrent != 0 && flags&CreateRedefine == 0 {
		return nil, invalidf("CURRENT is only valid with REDEFINE")
	}
	if err := checkSnapshotDisks(doc); err != nil {
		return nil, err
	}
	if flags&CreateRedefine != 0 {
		return d.redefine(ctx, domain, doc, flags)
	}
	v, err := d.sync(ctx, domain)
	if err != nil {
		return nil, err
	}
	active := v.src.State.Active()
	if flags&CreateLive != 0 && !active {
		return nil, fmt.Errorf("%w: LIVE applies to running domains; %s is shut off", ErrLiveUnsupported, domain)
	}
	diskOnly := flags&CreateDiskOnly != 0
	memory := doc.Memory != nil && doc.Memory.Snapshot != "" && doc.Memory.Snapshot != "no"
	if memory && diskOnly {
		return nil, invalidf("a disk-only snapshot cannot save memory")
	}
	if memory && !active {
		return nil, fmt.Errorf("%w: %s is shut off: it has no memory to save", ErrOperationInvalid, domain)
	}
	spec := storage.SnapshotSpec{
		Name:        doc.Name,
		Description: doc.Description,
		State:       string(v.src.State),
		DomainXML:   v.src.XML,
		NoMetadata:  flags&CreateNoMetadata != 0,
	}
	if spec.Name == "" {
		spec.Name = strconv.FormatInt(time.Now().Unix(), 10)
	}
	if spec.Disks, err = diskSpecs(v, doc, diskOnly, flags&CreateReuseExt != 0); err != nil {
		return nil, err
	}
	if active {
		return d.createActive(ctx, v, doc, flags, spec)
	}
	snap, err := d.st.CreateSnapshot(ctx, v.key, spec)
	if err != nil {
		return nil, err
	}
	// HALT on a shut-off domain has nothing to stop.
	return snap, d.afterChange(ctx, v)
}

// diskSpecs resolves each disk's mode and overlay from the XML and the
// defaults.
func diskSpecs(v *domainView, doc *libvirtxml.DomainSnapshot, diskOnly, reuse bool) ([]storage.SnapshotDiskSpec, error) {
	byTarget := map[string]*libvirtxml.DomainSnapshotDisk{}
	if doc.Disks != nil {
		for i := range doc.Disks.Disks {
			sd := &doc.Disks.Disks[i]
			target := ""
			for _, di := range v.disks {
				if sd.Name == di.Target || sameFile(sd.Name, di.Path) {
					target = di.Target
				}
			}
			// libvirt (virDomainSnapshotAlignDisks) reports both as
			// VIR_ERR_CONFIG_UNSUPPORTED.
			if target == "" {
				return nil, fmt.Errorf("%w: no disk named %q in domain %s", ErrUnsupported, sd.Name, v.src.Name)
			}
			if byTarget[target] != nil {
				return nil, fmt.Errorf("%w: disk %s specified twice", ErrUnsupported, target)
			}
			byTarget[target] = sd
		}
	}
	var out []storage.SnapshotDiskSpec
	for _, di := range v.disks {
		mode := di.Snapshot
		sd := byTarget[di.Target]
		if sd != nil && sd.Snapshot != "" {
			mode = sd.Snapshot
		}
		if mode == "" {
			mode = "internal"
			if diskOnly {
				mode = "external"
			}
		}
		spec := storage.SnapshotDiskSpec{Target: di.Target}
		switch mode {
		case "no":
			spec.Mode = storage.DiskNone
		case "internal":
			if diskOnly {
				return nil, invalidf("disk %s: a disk-only snapshot is external", di.Target)
			}
			spec.Mode = storage.DiskInternal
		case "external":
			spec.Mode, spec.Reuse = storage.DiskExternal, reuse
			if sd != nil && sd.Source != nil && sd.Source.File != nil {
				spec.Overlay = sd.Source.File.File
			}
			if sd != nil && sd.Driver != nil {
				spec.Format = sd.Driver.Type
			}
		default:
			return nil, fmt.Errorf("%w: disk %s: snapshot mode %q", ErrUnsupported, di.Target, mode)
		}
		out = append(out, spec)
	}
	return out, nil
}

func sameFile(a, b string) bool {
	aa, err1 := filepath.Abs(a)
	bb, err2 := filepath.Abs(b)
	return err1 == nil && err2 == nil && aa == bb
}

// redefine records a snapshot from its full XML (as snapshot-dumpxml
// printed it) without touching any disk: libvirt's REDEFINE.
func (d *Driver) redefine(ctx context.Context, domain string, doc *libvirtxml.DomainSnapshot, flags CreateFlags) (*Snapshot, error) {
	v, err := d.sync(ctx, domain)
	if err != nil {
		return nil, err
	}
	if doc.Name == "" {
		return nil, invalidf("REDEFINE needs the snapshot's name")
	}
	snap := &storage.Snapshot{Name: doc.Name, Description: doc.Description, State: doc.State}
	if snap.State == "" {
		snap.State = string(StateShutoff)
	}
	if doc.CreationTime != "" {
		secs, err := strconv.ParseInt(doc.CreationTime, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%w: creationTime %q", ErrXML, doc.CreationTime)
		}
		snap.Created = time.Unix(secs, 0).UTC()
	}
	if doc.Parent != nil {
		snap.Parent = doc.Parent.Name
	}
	if doc.Memory != nil && doc.Memory.Snapshot == "external" {
		snap.Memory = doc.Memory.File
	}
	if doc.Domain != nil {
		// libvirt's virDomainSnapshotRedefineValidate: the definition must
		// be this domain's, or a revert would install another domain's.
		cur, err := parseDomain(v.src.XML)
		if err != nil {
			return nil, err
		}
		if err := checkTargets(doc.Domain); err != nil {
			return nil, err
		}
		if doc.Domain.Name != v.src.Name || doc.Domain.UUID != "" && cur.UUID != "" && !strings.EqualFold(doc.Domain.UUID, cur.UUID) {
			return nil, invalidf("definition for snapshot %s must be domain %s (uuid %s), not %s (uuid %s)",
				doc.Name, v.src.Name, cur.UUID, doc.Domain.Name, doc.Domain.UUID)
		}
		if snap.DomainXML, err = marshalDomain(doc.Domain); err != nil {
			return nil, err
		}
	}
	if doc.Disks != nil {
		for _, sd := range doc.Disks.Disks {
			rec := storage.SnapshotDisk{Target: sd.Name, Mode: storage.DiskMode(sd.Snapshot)}
			if rec.Mode == "" {
				rec.Mode = storage.DiskInternal
			}
			if sd.Source != nil && sd.Source.File != nil {
				rec.Overlay = sd.Source.File.File
			}
			snap.Disks = append(snap.Disks, rec)
		}
	}
	if err := d.st.RedefineSnapshot(ctx, v.key, snap, flags&CreateCurrent != 0); err != nil {
		return nil, err
	}
	return d.st.Snapshot(ctx, v.key, snap.Name)
}

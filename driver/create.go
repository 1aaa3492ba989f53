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

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
)

// SnapshotRequest is the typed form of a snapshot request (the libxl
// snapshot API's shape): it takes the same path as SnapshotCreateXML.
type SnapshotRequest struct {
	Name        string
	Description string
	// Memory asks for the domain's memory to be saved to MemoryPath;
	// without it the request says <memory snapshot='no'/>, so a running
	// domain's snapshot holds its disks alone.
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

// CreateSnapshot is SnapshotCreateXML for a typed request: it takes a
// new snapshot. It does not redefine one: REDEFINE records an existing
// snapshot from the whole document SnapshotGetXMLDesc gives (creation
// time, state, the domain definition of its time), which a request has
// no fields for; pass that document to SnapshotCreateXML.
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for CreateRedefine (and
// so for CreateCurrent, which needs it); otherwise those of
// SnapshotCreateXML.
func (d *Driver) CreateSnapshot(ctx context.Context, domain string, req SnapshotRequest, flags CreateFlags) (*Snapshot, error) {
	if err := checkCreateFlags("CreateSnapshot", flags); err != nil {
		return nil, err
	}
	if flags&CreateRedefine != 0 {
		return nil, invalidf("CreateSnapshot takes new snapshots: use SnapshotCreateXML with the snapshot's XML (SnapshotGetXMLDesc) to redefine one")
	}
	doc := &libvirtxml.DomainSnapshot{Name: req.Name, Description: req.Description}
	doc.Memory = &libvirtxml.DomainSnapshotMemory{Snapshot: "no"}
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
	// The typed form asks what the XML would: libvirt's rules (an
	// absolute memory file, say) hold for it too.
	if err := checkSnapshotValues(doc); err != nil {
		return nil, err
	}
	if flags&CreateValidate != 0 {
		text, err := doc.Marshal()
		if err != nil {
			return nil, fmt.Errorf("%w: %w", errdefs.ErrInternal, err)
		}
		if err := validateSchema(ctx, text); err != nil {
			return nil, err
		}
	}
	rec, err := d.create(ctx, domain, doc, flags)
	return d.created(ctx, domain, rec, flags, d.momentExists(ctx, domain, doc.Name, err))
}

// SnapshotCreateXML is virDomainSnapshotCreateXML: it takes a snapshot
// described by libvirt's domain snapshot XML, with libvirt's defaults:
// the name is the current time in seconds; a disk's mode comes from the
// XML, else the disk's own snapshot="..." attribute, else external with
// DISK_ONLY and internal without; an external overlay goes next to the
// image, named after the snapshot, in qcow2. The new snapshot becomes
// current. A running or paused domain's snapshot without DISK_ONLY is a
// full system checkpoint: its memory is saved too (see createActive).
// An external disk whose chain, new overlay included, would pass its
// pool's depth limit (Config.MaxDepth, PoolMaxDepth; 30 by default)
// first has the domain coalesced (see Coalesce; before the guest pauses,
// for a checkpoint), else the snapshot is refused with a
// *ChainTooLongError (ErrOperationInvalid, 55) naming the layers that
// hold the chain long. With REDEFINE it records a snapshot from the XML snapshot-dumpxml
// printed, touching no image; what libvirt requires of such a document
// is required (a name, creationTime, state, an existing parent).
//
// Errors, with libvirt's codes (errdefs.CodeOf): flags libvirt refuses
// (unknown bits, its exclusive and required pairs) and a redefined
// snapshot's missing parent are errdefs.ErrInvalidArg (8); XML that is
// not well-formed, and a name with '/' or a leading '.', ErrXMLDetail
// (35); a document libvirt's schema refuses under VALIDATE,
// ErrInvalidSchema (92); a value libvirt's parser refuses (an unknown
// snapshot mode, memory of a shut-off domain or with DISK_ONLY, no name
// or state on redefine), ErrXML (27); no creationTime on redefine,
// ErrInternal (1, as libvirt); a disk mode or source xlsnap or libvirt
// cannot snapshot (an internal disk with DISK_ONLY), ErrUnsupported
// (67); memory the hypervisor back end cannot save, ErrLiveUnsupported
// (84); a name already taken, ErrSnapshotExists (9, libvirt's "operation
// failed"); on redefine, an existing snapshot whose new document names
// disks or overlays the domain's image tree does not hold, and any
// document whose external disk names an overlay or state image another
// snapshot's record names (a delete would merge that snapshot's data
// away; libvirt, which never merges, has no such check), ErrInvalidArg
// (8); and those of every call that changes something (see the package
// documentation).
//
// It returns the snapshot's view (current, as libvirt makes a new
// snapshot current; HasMetadata false with CreateNoMetadata). With
// REDEFINE of an existing snapshot whose document names the disks,
// modes and overlays its record holds (what snapshot-dumpxml printed),
// the record keeps its images, wherever the disks are now: libvirt
// checks such a redefine against the snapshot itself
// (virDomainSnapshotRedefineValidate), and virsh's snapshot-current NAME
// is exactly that call with CreateCurrent.
func (d *Driver) SnapshotCreateXML(ctx context.Context, domain, xmlDesc string, flags CreateFlags) (*Snapshot, error) {
	if err := checkCreateFlags("SnapshotCreateXML", flags); err != nil {
		return nil, err
	}
	doc, err := parseSnapshot(ctx, xmlDesc, flags&CreateValidate != 0)
	if err != nil {
		return nil, err
	}
	rec, err := d.create(ctx, domain, doc, flags)
	return d.created(ctx, domain, rec, flags, d.momentExists(ctx, domain, doc.Name, err))
}

// created is the view of a snapshot create or redefine recorded (rec nil
// when it failed), with err, the call's error, passed through: a
// snapshot that was taken is returned even when a later step (rewriting
// the definition) failed, as before the view existed.
func (d *Driver) created(ctx context.Context, domain string, rec *storage.Snapshot, flags CreateFlags, err error) (*Snapshot, error) {
	if rec == nil {
		return nil, err
	}
	if flags&CreateNoMetadata != 0 {
		s := snapshotOf(rec)
		s.HasMetadata = false
		return s, err
	}
	t, terr := d.snapshots(ctx, domain)
	if terr != nil {
		return snapshotOf(rec), errors.Join(err, terr)
	}
	return t.view(rec), err
}

// checkCreateFlags checks create's flags in libvirt's order: the public
// entry point's pairs (virDomainSnapshotCreateXML), then the QEMU
// driver's (qemuSnapshotCreateXML).
func checkCreateFlags(call string, flags CreateFlags) error {
	for _, err := range []error{
		requires(flags, CreateCurrent, CreateRedefine),
		exclusive(flags, CreateRedefine, CreateNoMetadata),
		exclusive(flags, CreateRedefine, CreateHalt),
		checkFlags(call, flags, createKnown),
		requires(flags, CreateQuiesce, CreateDiskOnly),
		exclusive(flags, CreateLive, CreateRedefine),
	} {
		if err != nil {
			return err
		}
	}
	return nil
}

// MaxSnapshotXML bounds a snapshot XML document at 10 MiB, what virsh
// reads from an XML file (VSH_MAX_XML_FILE): a document virsh can send
// is one xlsnap takes. A real one is a few KiB even with the domain
// definition inside.
const MaxSnapshotXML = 10 << 20

// parseSnapshot reads a snapshot XML document: one root element, nothing
// but whitespace and comments after it, at most MaxSnapshotXML bytes.
// As in libvirt, a document that is not well-formed is ErrXMLDetail, and
// validation (with validate) comes before any other check of its content.
func parseSnapshot(ctx context.Context, xmlDesc string, validate bool) (*libvirtxml.DomainSnapshot, error) {
	if len(xmlDesc) > MaxSnapshotXML {
		return nil, fmt.Errorf("%w: snapshot XML of %d bytes (at most %d)", errdefs.ErrXMLDetail, len(xmlDesc), MaxSnapshotXML)
	}
	if err := wellFormed(xmlDesc); err != nil {
		return nil, err
	}
	if validate {
		if err := validateSchema(ctx, xmlDesc); err != nil {
			return nil, err
		}
	}
	var doc libvirtxml.DomainSnapshot
	if err := xml.Unmarshal([]byte(firstChildren(xmlDesc)), &doc); err != nil {
		// Well-formed, so the root element or a value is wrong.
		return nil, fmt.Errorf("%w: snapshot XML: %w", errdefs.ErrXML, err)
	}
	if err := checkSnapshotValues(&doc); err != nil {
		return nil, err
	}
	return &doc, nil
}

// firstChildren is a well-formed snapshot document without the second
// and later occurrences of each element under its root. libvirt reads
// each of them with an XPath lookup that takes the first (two
// <description> elements: the first is the description), where
// encoding/xml would keep the last; every child of <domainsnapshot> is
// single in libvirt's schema.
func firstChildren(xmlDesc string) string {
	dec := xml.NewDecoder(strings.NewReader(xmlDesc))
	var out strings.Builder
	seen := map[xml.Name]bool{}
	depth := 0
	kept, cut := int64(0), int64(-1) // xmlDesc[:kept] is decided; cut: start of a repeat
	for {
		start := dec.InputOffset()
		tok, err := dec.Token()
		if err != nil {
			break // wellFormed has read the document: this is its end
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if depth == 1 {
				if seen[t.Name] {
					cut = start
				}
				seen[t.Name] = true
			}
			depth++
		case xml.EndElement:
			depth--
			if depth == 1 && cut >= 0 {
				out.WriteString(xmlDesc[kept:cut])
				kept, cut = dec.InputOffset(), -1
			}
		}
	}
	out.WriteString(xmlDesc[kept:])
	return out.String()
}

// wellFormed checks that a document is one well-formed element with only
// whitespace and comments around it.
func wellFormed(xmlDesc string) error {
	dec := xml.NewDecoder(strings.NewReader(xmlDesc))
	depth, roots := 0, 0
	for {
		tok, err := dec.Token()
		if errors.Is(err, io.EOF) {
			if roots == 0 {
				return fmt.Errorf("%w: snapshot XML: no root element", errdefs.ErrXMLDetail)
			}
			return nil
		}
		if err != nil {
			return fmt.Errorf("%w: snapshot XML: %w", errdefs.ErrXMLDetail, err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if depth == 0 {
				if roots++; roots > 1 {
					return fmt.Errorf("%w: snapshot XML: content after the root element (at byte %d)", errdefs.ErrXMLDetail, dec.InputOffset())
				}
				// libvirt's parser checks the root before the rest.
				if t.Name.Local != "domainsnapshot" {
					return fmt.Errorf("%w: expecting root element of 'domainsnapshot', not '%s'", errdefs.ErrXML, t.Name.Local)
				}
			}
			depth++
		case xml.EndElement:
			depth--
		case xml.CharData:
			if depth == 0 && len(bytes.TrimSpace(t)) != 0 {
				return fmt.Errorf("%w: snapshot XML: text outside the root element (at byte %d)", errdefs.ErrXMLDetail, dec.InputOffset())
			}
		}
	}
}

// checkSnapshotValues refuses what libvirt's parser (virDomainSnapshotDefParse)
// refuses whatever the domain: unknown snapshot modes, and a memory
// element whose mode and file disagree, each with libvirt's message and
// VIR_ERR_XML_ERROR.
func checkSnapshotValues(doc *libvirtxml.DomainSnapshot) error {
	if m := doc.Memory; m != nil {
		switch m.Snapshot {
		case "", "no", "internal", "external":
		case "manual":
			return fmt.Errorf("%w: 'manual' memory snapshot mode not supported", errdefs.ErrXML)
		default:
			return badValue("memory", m.Snapshot)
		}
		if m.Snapshot == "" && m.File != "" {
			m.Snapshot = "external"
		}
		switch {
		case m.File != "" && m.Snapshot != "external":
			return fmt.Errorf("%w: memory filename '%s' requires external snapshot", errdefs.ErrXML, m.File)
		case m.File == "" && m.Snapshot == "external":
			return fmt.Errorf("%w: external memory snapshots require a filename", errdefs.ErrXML)
		case m.File != "" && !filepath.IsAbs(m.File):
			return fmt.Errorf("%w: memory snapshot file path (%s) must be absolute", errdefs.ErrXML, m.File)
		}
	}
	if doc.Disks != nil {
		for _, sd := range doc.Disks.Disks {
			switch sd.Snapshot {
			case "", "no", "internal", "external", "manual":
			default:
				return badValue("disk", sd.Snapshot)
			}
		}
	}
	return nil
}

// badValue is libvirt's refusal of an unknown snapshot attribute value,
// in its words (virXMLPropEnum), final stop included.
func badValue(element, value string) error {
	msg := fmt.Sprintf("Invalid value for attribute 'snapshot' in element '%s': '%s'.", element, value)
	return fmt.Errorf("%w: %s", errdefs.ErrXML, msg)
}

// checkName refuses the snapshot names libvirt's QEMU driver refuses
// (qemuSnapshotCreateXMLValidateDef), with its messages and
// VIR_ERR_XML_DETAIL: its metadata is a file named after the snapshot,
// as xlsnap's overlays are.
func checkName(name string) error {
	switch {
	case strings.Contains(name, "/"):
		return fmt.Errorf("%w: invalid snapshot name '%s': name can't contain '/'", errdefs.ErrXMLDetail, name)
	case strings.HasPrefix(name, "."):
		return fmt.Errorf("%w: invalid snapshot name '%s': name can't start with '.'", errdefs.ErrXMLDetail, name)
	}
	return nil
}

// memoryState says whether the document asks for the domain's memory.
func memoryState(doc *libvirtxml.DomainSnapshot) bool {
	return doc.Memory != nil && doc.Memory.Snapshot != "" && doc.Memory.Snapshot != "no"
}

// errOfflineMemory is libvirt's refusal of memory state where there is
// none to save: a shut-off domain, or DISK_ONLY.
func errOfflineMemory() error {
	return fmt.Errorf("%w: memory state cannot be saved with offline or disk-only snapshot", errdefs.ErrXML)
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

func (d *Driver) create(ctx context.Context, domain string, doc *libvirtxml.DomainSnapshot, flags CreateFlags) (*storage.Snapshot, error) {
	if flags&CreateRedefine != 0 {
		return d.redefine(ctx, domain, doc, flags)
	}
	if flags&CreateNoMetadata == 0 {
		if err := checkName(doc.Name); err != nil {
			return nil, err
		}
	}
	if err := checkSnapshotDisks(doc); err != nil {
		return nil, err
	}
	if flags&CreateQuiesce != 0 {
		return nil, fmt.Errorf("%w: QUIESCE needs a guest agent, which xlsnap does not drive", errdefs.ErrUnsupported)
	}
	ctx, unlock, err := d.lockCall(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, err := d.sync(ctx, domain)
	if err != nil {
		return nil, err
	}
	active := v.src.State.Active()
	diskOnly := flags&CreateDiskOnly != 0
	// libvirt parses a snapshot of a shut-off domain, or one with
	// DISK_ONLY, as offline: memory state is an XML error there.
	if memoryState(doc) && (diskOnly || !active) {
		return nil, errOfflineMemory()
	}
	if active && !diskOnly && doc.Memory == nil {
		// libvirt's default for a running domain is a full system
		// checkpoint; xlsnap's memory is always a file of its own.
		file, err := defaultMemoryFile(v, doc.Name)
		if err != nil {
			return nil, err
		}
		doc.Memory = &libvirtxml.DomainSnapshotMemory{Snapshot: "external", File: file}
	}
	// libvirt (qemuSnapshotCreateXMLValidateDef): LIVE only for a full
	// system checkpoint of an active domain.
	if flags&CreateLive != 0 && (!active || !memoryState(doc)) {
		return nil, fmt.Errorf("%w: live snapshot creation is supported only during full system snapshots", errdefs.ErrLiveUnsupported)
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
		doc.Name = spec.Name
	}
	if spec.Disks, err = diskSpecs(v, doc, diskOnly, flags&CreateReuseExt != 0); err != nil {
		return nil, err
	}
	if err := checkSelected(spec.Disks, diskOnly, memoryState(doc)); err != nil {
		return nil, err
	}
	if spec.XML, err = keptXML(doc); err != nil {
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

// defaultMemoryFile is where a full system checkpoint that names no
// memory file saves the memory: beside the domain's first disk, named
// after the domain and the snapshot.
func defaultMemoryFile(v *domainView, snapshot string) (string, error) {
	if len(v.disks) == 0 {
		return "", fmt.Errorf("%w: domain %s has no file disk to save its memory beside: name the file (<memory snapshot='external' file='...'/>)", errdefs.ErrInvalidArg, v.src.Name)
	}
	if snapshot == "" {
		snapshot = strconv.FormatInt(time.Now().Unix(), 10)
	}
	return filepath.Join(filepath.Dir(v.disks[0].Path), v.src.Name+"."+snapshot+".mem"), nil
}

// keptXML is the snapshot document as its record keeps it: without the
// domain definition, which the record holds on its own.
func keptXML(doc *libvirtxml.DomainSnapshot) (string, error) {
	kept := *doc
	kept.Domain = nil
	out, err := kept.Marshal()
	if err != nil {
		return "", fmt.Errorf("%w: snapshot XML: %w", errdefs.ErrInternal, err)
	}
	return out, nil
}

// checkSelected refuses a snapshot that would capture nothing, which
// would be recorded and then revert nothing: libvirt's
// qemuSnapshotPrepare says the same, both as VIR_ERR_CONFIG_UNSUPPORTED.
func checkSelected(disks []storage.SnapshotDiskSpec, diskOnly, memory bool) error {
	for _, ds := range disks {
		if ds.Mode != storage.DiskNone {
			return nil
		}
	}
	if diskOnly {
		return fmt.Errorf("%w: disk-only snapshots require at least one disk to be selected for snapshot", errdefs.ErrUnsupported)
	}
	if !memory {
		return fmt.Errorf("%w: nothing selected for snapshot", errdefs.ErrUnsupported)
	}
	return nil
}

// diskSpecs resolves each disk's mode and overlay from the XML and the
// defaults. Disks the XML names by path are renamed to their targets in
// doc, as libvirt's virDomainSnapshotAlignDisks does.
func diskSpecs(v *domainView, doc *libvirtxml.DomainSnapshot, diskOnly, reuse bool) ([]storage.SnapshotDiskSpec, error) {
	byTarget, err := alignDisks(v, doc)
	if err != nil {
		return nil, err
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
			// libvirt's QEMU driver reports an internal disk in a
			// disk-only snapshot as VIR_ERR_CONFIG_UNSUPPORTED.
			if diskOnly {
				return nil, fmt.Errorf("%w: disk %s: a disk-only snapshot cannot be internal", errdefs.ErrUnsupported, di.Target)
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
			return nil, fmt.Errorf("%w: disk %s: snapshot mode %q", errdefs.ErrUnsupported, di.Target, mode)
		}
		out = append(out, spec)
	}
	return out, nil
}

// alignDisks maps the XML's disks to the domain's targets, each named by
// its target afterwards. libvirt (virDomainSnapshotAlignDisks) reports an
// unknown disk and one named twice as VIR_ERR_CONFIG_UNSUPPORTED.
func alignDisks(v *domainView, doc *libvirtxml.DomainSnapshot) (map[string]*libvirtxml.DomainSnapshotDisk, error) {
	byTarget := map[string]*libvirtxml.DomainSnapshotDisk{}
	if doc.Disks == nil {
		return byTarget, nil
	}
	for i := range doc.Disks.Disks {
		sd := &doc.Disks.Disks[i]
		target := ""
		for _, di := range v.disks {
			if sd.Name == di.Target || sameFile(sd.Name, di.Path) {
				target = di.Target
			}
		}
		if target == "" {
			return nil, fmt.Errorf("%w: no disk named %q in domain %s", errdefs.ErrUnsupported, sd.Name, v.src.Name)
		}
		if byTarget[target] != nil {
			return nil, fmt.Errorf("%w: disk %s specified twice", errdefs.ErrUnsupported, target)
		}
		sd.Name = target
		byTarget[target] = sd
	}
	return byTarget, nil
}

func sameFile(a, b string) bool {
	aa, err1 := filepath.Abs(a)
	bb, err2 := filepath.Abs(b)
	return err1 == nil && err2 == nil && aa == bb
}

// redefine records a snapshot from its full XML (as snapshot-dumpxml
// printed it) without touching any disk: libvirt's REDEFINE. What
// libvirt's parser and virDomainSnapshotRedefinePrep require is
// required, with their messages and codes; the document is kept whole in
// the record, so dumpxml gives back what it held.
func (d *Driver) redefine(ctx context.Context, domain string, doc *libvirtxml.DomainSnapshot, flags CreateFlags) (*storage.Snapshot, error) {
	// libvirt finds the domain before it reads the document.
	ctx, unlock, err := d.lockCall(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	v, err := d.sync(ctx, domain)
	if err != nil {
		return nil, err
	}
	snap, err := redefinedRecord(doc, flags)
	if err != nil {
		return nil, err
	}
	if err := checkName(doc.Name); err != nil {
		return nil, err
	}
	if err := checkSnapshotDisks(doc); err != nil {
		return nil, err
	}
	if snap.Parent != "" {
		if _, err := d.st.Snapshot(ctx, v.key, snap.Parent); errors.Is(err, storage.ErrNoSnapshot) {
			return nil, fmt.Errorf("%w: parent %s for moment %s not found", errdefs.ErrInvalidArg, snap.Parent, snap.Name)
		} else if err != nil {
			return nil, err
		}
	}
	// libvirt (virDomainSnapshotRedefineValidate) checks a redefine of an
	// existing snapshot against that snapshot: it may not move between
	// online and offline nor between disk-only and full system, and a
	// document without <domain> keeps the definition recorded, which a
	// revert needs.
	old, err := d.st.Snapshot(ctx, v.key, snap.Name)
	switch {
	case errors.Is(err, storage.ErrNoSnapshot):
		old = nil
	case err != nil:
		return nil, err
	}
	if old != nil {
		if err := sameKind(old, snap); err != nil {
			return nil, err
		}
		snap.DomainXML = old.DomainXML
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
			return nil, fmt.Errorf("%w: definition for snapshot %s must be domain %s (uuid %s), not %s (uuid %s)", errdefs.ErrInvalidArg,
				doc.Name, v.src.Name, cur.UUID, doc.Domain.Name, doc.Domain.UUID)
		}
		if snap.DomainXML, err = marshalDomain(doc.Domain); err != nil {
			return nil, err
		}
	}
	byTarget, err := alignDisks(v, doc)
	if err != nil {
		return nil, err
	}
	if doc.Domain != nil || old != nil && old.DomainXML != "" {
		defaultDisks(v, doc, byTarget, old)
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
	if snap.XML, err = keptXML(doc); err != nil {
		return nil, err
	}
	if err := d.st.RedefineSnapshot(ctx, v.key, snap, flags&CreateCurrent != 0); err != nil {
		return nil, err
	}
	return d.st.Snapshot(ctx, v.key, snap.Name)
}

// defaultDisks gives every disk of the domain that a redefined document
// leaves out its default mode, as libvirt's virDomainSnapshotAlignDisks
// does on redefine when the snapshot has a domain definition (its own
// <domain>, or the one recorded for it): the disk's own snapshot="..." attribute, else
// external for a disk-only snapshot (its overlay named as libvirt names
// it, after the image and the snapshot) and internal otherwise. A
// snapshot already recorded keeps its record's mode and overlay for the
// disk. Without this a document with no <disks> recorded a snapshot of
// nothing, whose revert changed no disk and reported success.
func defaultDisks(v *domainView, doc *libvirtxml.DomainSnapshot, byTarget map[string]*libvirtxml.DomainSnapshotDisk, old *storage.Snapshot) {
	images := map[string]string{}
	if doc.Domain != nil {
		for _, di := range fileDisks(doc.Domain) {
			images[di.Target] = di.Path
		}
	}
	for _, di := range v.disks {
		if byTarget[di.Target] != nil {
			continue
		}
		sd := libvirtxml.DomainSnapshotDisk{Name: di.Target, Snapshot: di.Snapshot}
		var rec *storage.SnapshotDisk
		if old != nil {
			rec = old.Disk(di.Target)
		}
		switch {
		case rec != nil:
			sd.Snapshot = string(rec.Mode)
			if rec.Mode == storage.DiskExternal && rec.Overlay != "" {
				sd.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: rec.Overlay}}
			}
		case sd.Snapshot == "" && doc.State == "disk-snapshot":
			sd.Snapshot = "external"
		case sd.Snapshot == "":
			sd.Snapshot = "internal"
		}
		if sd.Snapshot == "external" && sd.Source == nil {
			image := images[di.Target]
			if image == "" {
				image = di.Path
			}
			sd.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: storage.DefaultOverlayPath(image, doc.Name)}}
		}
		if doc.Disks == nil {
			doc.Disks = &libvirtxml.DomainSnapshotDisks{}
		}
		doc.Disks.Disks = append(doc.Disks.Disks, sd)
	}
}

// redefinedRecord checks a redefined document as libvirt's parser does
// (virDomainSnapshotDefParse with PARSE_REDEFINE, in its order) and
// makes the record's own fields from it.
func redefinedRecord(doc *libvirtxml.DomainSnapshot, flags CreateFlags) (*storage.Snapshot, error) {
	if doc.Name == "" {
		return nil, fmt.Errorf("%w: a redefined snapshot must have a name", errdefs.ErrXML)
	}
	// libvirt reports this one as an internal error.
	secs, err := strconv.ParseInt(strings.TrimSpace(doc.CreationTime), 10, 64)
	if err != nil {
		return nil, fmt.Errorf("%w: missing creationTime from existing snapshot", errdefs.ErrInternal)
	}
	switch doc.State {
	case "":
		return nil, fmt.Errorf("%w: missing state from existing snapshot", errdefs.ErrXML)
	case "running", "blocked", "paused", "shutdown", "shutoff", "crashed", "disk-snapshot", "pmsuspended":
	default:
		return nil, fmt.Errorf("%w: Invalid state '%s' in domain snapshot XML", errdefs.ErrUnsupported, doc.State)
	}
	offline := doc.State == "shutoff" || doc.State == "disk-snapshot"
	if offline && memoryState(doc) {
		return nil, errOfflineMemory()
	}
	// virDomainSnapshotRedefineValidate.
	if flags&CreateDiskOnly != 0 && doc.State != "disk-snapshot" {
		return nil, fmt.Errorf("%w: disk-only flag for snapshot %s requires disk-snapshot state", errdefs.ErrInvalidArg, doc.Name)
	}
	snap := &storage.Snapshot{Name: doc.Name, Description: doc.Description, State: doc.State,
		Created: time.Unix(secs, 0).UTC()}
	if doc.Parent != nil {
		snap.Parent = doc.Parent.Name
	}
	if doc.Memory != nil && doc.Memory.Snapshot == "external" {
		snap.Memory = doc.Memory.File
	}
	return snap, nil
}

// sameKind refuses, as libvirt does with VIR_ERR_INVALID_ARG, a redefine
// that turns a recorded snapshot from online (running, paused) to offline
// or back, or from disk-only to full system or back: its images and
// memory were taken as the recorded kind.
func sameKind(old, redefined *storage.Snapshot) error {
	online := func(state string) bool { return state == string(StateRunning) || state == string(StatePaused) }
	switch {
	case online(old.State) != online(redefined.State):
		return fmt.Errorf("%w: cannot change between online and offline snapshot state in snapshot %s", errdefs.ErrInvalidArg, old.Name)
	case (old.State == "disk-snapshot") != (redefined.State == "disk-snapshot"):
		return fmt.Errorf("%w: cannot change between disk only and full system in snapshot %s", errdefs.ErrInvalidArg, old.Name)
	}
	return nil
}

// momentExists words a create's ErrSnapshotExists as libvirt does
// (virDomainMomentAssignDef) when the domain has a snapshot of that name,
// for every front to print; an image's own internal snapshot of the name
// keeps its detail.
func (d *Driver) momentExists(ctx context.Context, domain, name string, err error) error {
	if !errors.Is(err, ErrSnapshotExists) || name == "" {
		return err
	}
	if _, lerr := d.SnapshotLookupByName(ctx, domain, name, 0); lerr != nil {
		return err
	}
	return fmt.Errorf("%w: domain moment %s already exists", ErrSnapshotExists, name)
}

package libxl

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/domxml"
)

// Disk is where a disk is to point: Path is libxl's pdev_path, Format
// its disk format ("qcow2", "raw"; empty keeps the current one).
type Disk struct {
	Path   string
	Format string
}

// RepointDisks returns definition, libxl's JSON domain configuration,
// with the disks named by their vdev ("xvda") pointing elsewhere, the
// rest unchanged. This is what Restore needs after a snapshot: libxl
// restores a domain onto the disks its configuration names.
func RepointDisks(definition string, disks map[string]Disk) (string, error) {
	dec := json.NewDecoder(strings.NewReader(definition))
	dec.UseNumber() // 64-bit sizes stay exact
	var cfg map[string]any
	if err := dec.Decode(&cfg); err != nil {
		return "", fmt.Errorf("%w: libxl domain configuration: %v", errdefs.ErrInvalidArg, err)
	}
	list, _ := cfg["disks"].([]any)
	done := map[string]bool{}
	for _, d := range list {
		disk, ok := d.(map[string]any)
		if !ok {
			continue
		}
		vdev, _ := disk["vdev"].(string)
		to, ok := disks[vdev]
		if !ok {
			continue
		}
		if to.Path == "" {
			return "", fmt.Errorf("%w: no path for disk %s", errdefs.ErrInvalidArg, vdev)
		}
		disk["pdev_path"] = to.Path
		if to.Format != "" {
			disk["format"] = to.Format
		}
		done[vdev] = true
	}
	for vdev := range disks {
		if !done[vdev] {
			return "", fmt.Errorf("%w: the configuration has no disk %s", errdefs.ErrInvalidArg, vdev)
		}
	}
	var out bytes.Buffer
	enc := json.NewEncoder(&out)
	enc.SetEscapeHTML(false)
	enc.SetIndent("", "    ")
	if err := enc.Encode(cfg); err != nil {
		return "", err
	}
	return out.String(), nil
}

// restoreConfig is the libxl JSON configuration to restore domain with.
// definition is libxl's JSON as it stands, or the domain's libvirt XML,
// which is what xlsnap's driver passes: libxenlight parses no XML, so
// the configuration saved in the image (saved) is taken with its disks
// repointed at the XML's sources, matched by target (vdev). The rest of
// the XML is not read: memory, vCPUs and devices come back as saved.
func restoreConfig(domain, definition, saved string) (string, error) {
	def := strings.TrimSpace(definition)
	if !strings.HasPrefix(def, "<") {
		return definition, checkDefinition(domain, definition)
	}
	var dom libvirtxml.Domain
	if err := dom.Unmarshal(def); err != nil {
		return "", fmt.Errorf("%w: domain XML: %v", errdefs.ErrInvalidArg, err)
	}
	if dom.Name != domain {
		return "", fmt.Errorf("%w: the definition is of domain %q", errdefs.ErrInvalidArg, dom.Name)
	}
	if saved == "" {
		return "", fmt.Errorf("%w: the image carries no libxl configuration to repoint; pass libxl's JSON (Definition, RepointDisks)", errdefs.ErrUnsupported)
	}
	disks := map[string]Disk{}
	for _, d := range domxml.Disks(&dom) {
		path := d.File
		if path == "" {
			path = d.Block
		}
		if path == "" {
			return "", fmt.Errorf("%w: disk %s: only file and block sources can be restored onto", errdefs.ErrUnsupported, d.Target)
		}
		disks[d.Target] = Disk{Path: path, Format: d.Format}
	}
	out, err := RepointDisks(saved, disks)
	if err != nil {
		return "", err
	}
	return out, checkDefinition(domain, out)
}

// checkDefinition accepts libxl's JSON domain configuration of domain,
// the only form libxenlight itself parses: xl's config files are parsed
// by xl's own code.
func checkDefinition(domain, definition string) error {
	def := strings.TrimSpace(definition)
	switch {
	case def == "":
		return fmt.Errorf("%w: a restore needs the domain configuration with the disks it is to use", errdefs.ErrInvalidArg)
	case !strings.HasPrefix(def, "{"):
		return fmt.Errorf("%w: not libxl's JSON domain configuration nor libvirt XML (an xl config file? only xl parses those, not libxenlight)", errdefs.ErrUnsupported)
	}
	var cfg struct {
		CInfo struct {
			Name string `json:"name"`
		} `json:"c_info"`
	}
	if err := json.Unmarshal([]byte(def), &cfg); err != nil {
		return fmt.Errorf("%w: libxl domain configuration: %v", errdefs.ErrInvalidArg, err)
	}
	if cfg.CInfo.Name != domain {
		return fmt.Errorf("%w: the configuration is of domain %q", errdefs.ErrInvalidArg, cfg.CInfo.Name)
	}
	return nil
}

// xl's save file: a header, then libxl's migration stream. SaveMemory
// writes the header xl save writes, so `xl restore` takes the image too,
// and Restore reads images that xl save wrote (tools/xl/xl.h).
var xlMagic = [32]byte([]byte("Xen saved domain, xl format\n \x00 \r"))

const (
	xlByteOrder   = 0x01020304 // written in the host's byte order
	xlFlagJSON    = 1 << 0     // the configuration is libxl's JSON
	xlFlagStream2 = 1 << 1     // libxl's stream is version 2
	xlFlagsKnown  = xlFlagJSON | xlFlagStream2
)

type xlHeader struct {
	Magic          [32]byte
	ByteOrder      uint32
	MandatoryFlags uint32
	OptionalFlags  uint32
	OptionalLen    uint32
}

// writeXLHeader writes the header with the domain's configuration (JSON,
// NUL-terminated as xl writes it).
func writeXLHeader(w io.Writer, config string) error {
	cfg := append([]byte(config), 0)
	h := xlHeader{Magic: xlMagic, ByteOrder: xlByteOrder,
		MandatoryFlags: xlFlagStream2 | xlFlagJSON, OptionalLen: uint32(4 + len(cfg))}
	var buf bytes.Buffer
	binary.Write(&buf, binary.NativeEndian, h)
	binary.Write(&buf, binary.NativeEndian, uint32(len(cfg)))
	buf.Write(cfg)
	_, err := w.Write(buf.Bytes())
	return err
}

// xlMaxOptional bounds the optional data (the saved configuration) read
// from a header.
const xlMaxOptional = 16 << 20

// errNotXLImage: the file is not an xl save file.
var errNotXLImage = errors.New("not an xl save file")

// readXLHeader reads the header and what follows it up to the stream,
// returning libxl's stream version and the configuration saved with it.
func readXLHeader(r io.Reader) (streamVersion int, config string, err error) {
	var h xlHeader
	if err := binary.Read(r, binary.NativeEndian, &h); err != nil {
		return 0, "", fmt.Errorf("%w: %v", errNotXLImage, err)
	}
	if h.Magic != xlMagic {
		return 0, "", fmt.Errorf("%w: wrong magic", errNotXLImage)
	}
	if h.ByteOrder != xlByteOrder {
		return 0, "", fmt.Errorf("%w: saved on a host of another byte order", errdefs.ErrUnsupported)
	}
	if bad := h.MandatoryFlags &^ xlFlagsKnown; bad != 0 {
		return 0, "", fmt.Errorf("%w: xl save file with unknown mandatory flags %#x", errdefs.ErrUnsupported, bad)
	}
	// xl's optional data is the configuration, kilobytes; a header that
	// claims more is not one, and must not make the reader allocate it.
	if h.OptionalLen > xlMaxOptional {
		return 0, "", fmt.Errorf("%w: optional data of %d bytes", errNotXLImage, h.OptionalLen)
	}
	opt := make([]byte, h.OptionalLen)
	if _, err := io.ReadFull(r, opt); err != nil {
		return 0, "", fmt.Errorf("%w: truncated header: %v", errNotXLImage, err)
	}
	if len(opt) >= 4 {
		n := binary.NativeEndian.Uint32(opt)
		if uint64(n) > uint64(len(opt)-4) {
			return 0, "", fmt.Errorf("%w: truncated configuration", errNotXLImage)
		}
		config = string(bytes.TrimRight(opt[4:4+n], "\x00"))
	}
	streamVersion = 1
	if h.MandatoryFlags&xlFlagStream2 != 0 {
		streamVersion = 2
	}
	return streamVersion, config, nil
}

package main

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"strings"

	"github.com/xlsnap/xlsnap/errdefs"
)

// snapshot-create-as builds its document itself, as virsh does, so that
// --print-xml shows what virsh shows (layout, attribute order, quoting)
// and the driver receives the same text virsh would send libvirt.

// memSpec is a parsed --memspec: [file=]PATH and snapshot=MODE.
type memSpec struct {
	file, snapshot   string
	hasFile, hasSnap bool
}

// diskSpec is a parsed --diskspec: DISK, then snapshot=, driver=, file=
// and stype= (file or block, which makes file= a device).
type diskSpec struct {
	name, snapshot, driver, file, stype string
	hasSnap, hasDriver, hasFile         bool
}

// splitSpec splits a spec at its commas, ",," standing for a comma in a
// value, as virsh splits it.
func splitSpec(spec string) []string {
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(spec); i++ {
		switch {
		case spec[i] == ',' && i+1 < len(spec) && spec[i+1] == ',':
			cur.WriteByte(',')
			i++
		case spec[i] == ',':
			parts = append(parts, cur.String())
			cur.Reset()
		default:
			cur.WriteByte(spec[i])
		}
	}
	return append(parts, cur.String())
}

// parseMemspec reads --memspec; a part without a key is the file. Anything
// else virsh refuses (an unknown key, a key twice, a bare later part) is
// refused in its words.
func parseMemspec(spec string) (*memSpec, error) {
	bad := usagef("unable to parse memspec: %s", spec)
	var m memSpec
	for _, part := range splitSpec(spec) {
		k, v, ok := strings.Cut(part, "=")
		switch {
		case !ok && !m.hasFile:
			m.file, m.hasFile = part, true
		case ok && k == "file" && !m.hasFile:
			m.file, m.hasFile = v, true
		case ok && k == "snapshot" && !m.hasSnap:
			m.snapshot, m.hasSnap = v, true
		default:
			return nil, bad
		}
	}
	return &m, nil
}

// parseDiskspec reads --diskspec: the first part is the disk, whatever
// it holds.
func parseDiskspec(spec string) (*diskSpec, error) {
	bad := usagef("unable to parse diskspec: %s", spec)
	parts := splitSpec(spec)
	d := diskSpec{name: parts[0]}
	hasType := false
	for _, part := range parts[1:] {
		k, v, ok := strings.Cut(part, "=")
		switch {
		case ok && k == "snapshot" && !d.hasSnap:
			d.snapshot, d.hasSnap = v, true
		case ok && k == "driver" && !d.hasDriver:
			d.driver, d.hasDriver = v, true
		case ok && k == "file" && !d.hasFile:
			d.file, d.hasFile = v, true
		case ok && k == "stype" && !hasType:
			if v != "file" && v != "block" {
				return nil, errorLines{usagef("Unknown storage type: '%s'", v), bad}
			}
			d.stype, hasType = v, true
		default:
			return nil, bad
		}
	}
	return &d, nil
}

// snapshotXML is the document virsh's snapshot-create-as builds: two
// spaces an indent, single-quoted attributes, empty elements closed in
// place; no trailing newline.
func snapshotXML(name, description string, mem *memSpec, disks []*diskSpec) string {
	var b strings.Builder
	b.WriteString("<domainsnapshot>\n")
	if name != "" {
		fmt.Fprintf(&b, "  <name>%s</name>\n", escapeXML(name))
	}
	if description != "" {
		fmt.Fprintf(&b, "  <description>%s</description>\n", escapeXML(description))
	}
	if mem != nil {
		b.WriteString("  <memory")
		if mem.hasSnap {
			fmt.Fprintf(&b, " snapshot='%s'", escapeXML(mem.snapshot))
		}
		if mem.hasFile {
			fmt.Fprintf(&b, " file='%s'", escapeXML(mem.file))
		}
		b.WriteString("/>\n")
	}
	if len(disks) > 0 {
		b.WriteString("  <disks>\n")
		for _, d := range disks {
			fmt.Fprintf(&b, "    <disk name='%s'", escapeXML(d.name))
			if d.hasSnap {
				fmt.Fprintf(&b, " snapshot='%s'", escapeXML(d.snapshot))
			}
			if d.stype != "" {
				fmt.Fprintf(&b, " type='%s'", d.stype)
			}
			if !d.hasDriver && !d.hasFile {
				b.WriteString("/>\n")
				continue
			}
			b.WriteString(">\n")
			if d.hasDriver {
				fmt.Fprintf(&b, "      <driver type='%s'/>\n", escapeXML(d.driver))
			}
			if d.hasFile {
				attr := "file"
				if d.stype == "block" {
					attr = "dev"
				}
				fmt.Fprintf(&b, "      <source %s='%s'/>\n", attr, escapeXML(d.file))
			}
			b.WriteString("    </disk>\n")
		}
		b.WriteString("  </disks>\n")
	}
	b.WriteString("</domainsnapshot>")
	return b.String()
}

// escapeXML escapes as libvirt's buffers escape text and attribute
// values alike: the five markup characters as entities, and the control
// characters XML 1.0 cannot hold dropped (tab, newline and return stay).
func escapeXML(s string) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r == '&':
			b.WriteString("&amp;")
		case r == '<':
			b.WriteString("&lt;")
		case r == '>':
			b.WriteString("&gt;")
		case r == '\'':
			b.WriteString("&apos;")
		case r == '"':
			b.WriteString("&quot;")
		case r < 0x20 && r != '\t' && r != '\n' && r != '\r':
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

// fileError is a file the command could not read, worded as virsh words
// it; libvirt reports it as a system error (VIR_ERR_SYSTEM_ERROR), not a
// usage or internal one.
type fileError struct {
	msg string
	err error
}

func (e *fileError) Error() string    { return e.msg }
func (e *fileError) Unwrap() error    { return e.err }
func (e *fileError) LibvirtCode() int { return int(errdefs.CodeSystemError) }

// readFile reads a file named on the command line, failing as virsh
// does: "Failed to open file" or "Failed to read file", with the C
// library's description of the error.
func readFile(path string) ([]byte, error) {
	b, err := os.ReadFile(path)
	var pe *fs.PathError
	if err == nil || !errors.As(err, &pe) {
		return b, err
	}
	verb := "read"
	if pe.Op == "open" {
		verb = "open"
	}
	return nil, &fileError{msg: fmt.Sprintf("Failed to %s file '%s': %s", verb, path, strerror(pe.Err)), err: err}
}

// strerror is strerror(3)'s text: Go's descriptions of errno values are
// glibc's with the first letter lowered.
func strerror(err error) string {
	s := err.Error()
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

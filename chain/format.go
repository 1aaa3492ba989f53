package chain

import (
	"bytes"
	"fmt"
	"io"
)

// Format is an image format as QEMU names it.
type Format string

const (
	FormatRaw   Format = "raw"
	FormatQcow2 Format = "qcow2"
)

func (f Format) String() string { return string(f) }

// ParseFormat accepts the formats this package can read.
func ParseFormat(s string) (Format, error) {
	switch Format(s) {
	case FormatRaw, FormatQcow2:
		return Format(s), nil
	}
	return "", fmt.Errorf("%w: format %q", ErrUnsupported, s)
}

// foreignMagics are formats QEMU would probe but this package does not read;
// guessing "raw" for them would hand the guest a wrong view of its disk.
var foreignMagics = []struct {
	name   string
	offset int
	magic  []byte
}{
	{"vmdk", 0, []byte("KDMV")},
	{"vmdk", 0, []byte("# Disk DescriptorFile")},
	{"vdi", 0x40, []byte{0x7f, 0x10, 0xda, 0xbe}},
	{"vhdx", 0, []byte("vhdxfile")},
	{"vpc", 0, []byte("conectix")},
	{"qed", 0, []byte("QED\x00")},
	{"luks", 0, []byte("LUKS\xba\xbe")},
}

// Detect guesses the format from the first bytes, as qemu-img's probe does
// for the formats that matter here. Use it only on images the caller named
// or where a Policy allows probing.
func Detect(r io.ReaderAt) (Format, error) {
	var buf [72]byte
	n, err := r.ReadAt(buf[:], 0)
	if err != nil && err != io.EOF {
		return "", err
	}
	head := buf[:n]
	if bytes.HasPrefix(head, qcow2Magic[:]) {
		if n >= 8 && be32(head[4:]) < 2 {
			return "", fmt.Errorf("%w: qcow version 1", ErrUnsupported)
		}
		return FormatQcow2, nil
	}
	for _, m := range foreignMagics {
		if len(head) >= m.offset && bytes.HasPrefix(head[m.offset:], m.magic) {
			return "", fmt.Errorf("%w: format %s", ErrUnsupported, m.name)
		}
	}
	return FormatRaw, nil
}

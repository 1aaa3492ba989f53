package chain

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"io"
)

var qcow2Magic = [4]byte{'Q', 'F', 'I', 0xfb}

// Bounds QEMU itself enforces (block/qcow2.h); a header beyond them is
// refused before anything it claims is allocated or read.
const (
	minClusterBits       = 9
	maxClusterBits       = 21
	maxBackingNameLen    = 1023
	maxSnapshots         = 65536
	maxSnapshotTableSize = 1024 * maxSnapshots
	maxSnapshotExtraData = 1024
	v2HeaderLength       = 72
	minV3HeaderLength    = 104
	snapshotEntryFixed   = 40
	featureNameEntryLen  = 48
	firstReadSize        = 4096
)

// Incompatible feature bits (qcow2 spec).
const (
	IncompatDirty       uint64 = 1 << 0
	IncompatCorrupt     uint64 = 1 << 1
	IncompatDataFile    uint64 = 1 << 2
	IncompatCompression uint64 = 1 << 3
	IncompatExtendedL2  uint64 = 1 << 4
	knownIncompat              = IncompatDirty | IncompatCorrupt | IncompatDataFile | IncompatCompression | IncompatExtendedL2
)

// Compatible and autoclear feature bits.
const (
	CompatLazyRefcounts uint64 = 1 << 0
	AutoclearBitmaps    uint64 = 1 << 0
	AutoclearDataRaw    uint64 = 1 << 1
)

// Header extension types.
const (
	extTerminator    = 0x00000000
	extBackingFormat = 0xe2792aca
	extFeatureNames  = 0x6803f857
	extCryptoHeader  = 0x0537be77
	extBitmaps       = 0x23852875
	extDataFile      = 0x44415441
)

// Encryption methods.
const (
	CryptNone uint32 = 0
	CryptAES  uint32 = 1
	CryptLUKS uint32 = 2
)

// Compression types (v3 header byte 104).
const (
	CompressionZlib uint8 = 0
	CompressionZstd uint8 = 1
)

// Header is everything this package reads from a qcow2 image: the fixed
// header, its extensions, the backing reference and the snapshot table.
type Header struct {
	Version               uint32
	BackingFileOffset     uint64
	BackingFileSize       uint32
	ClusterBits           uint32
	VirtualSize           uint64
	CryptMethod           uint32
	L1Size                uint32
	L1TableOffset         uint64
	RefcountTableOffset   uint64
	RefcountTableClusters uint32
	NbSnapshots           uint32
	SnapshotsOffset       uint64
	IncompatibleFeatures  uint64
	CompatibleFeatures    uint64
	AutoclearFeatures     uint64
	RefcountOrder         uint32
	HeaderLength          uint32
	CompressionType       uint8

	// BackingFile is the reference exactly as stored; BackingFormat is the
	// backing format extension, empty when the image does not name one.
	BackingFile   string
	BackingFormat string
	// DataFile is the external data file extension, empty when absent.
	DataFile     string
	FeatureNames []FeatureName
	// Bitmaps is set only when the extension is present and valid (its
	// autoclear bit set); QEMU ignores a stale one.
	Bitmaps      *BitmapsExtension
	CryptoHeader *CryptoHeaderExtension
	Snapshots    []Snapshot
}

// FeatureType is the kind of feature a name table entry describes.
type FeatureType uint8

const (
	FeatureIncompatible FeatureType = 0
	FeatureCompatible   FeatureType = 1
	FeatureAutoclear    FeatureType = 2
)

// FeatureName is one entry of the feature name table.
type FeatureName struct {
	Type FeatureType
	Bit  uint8
	Name string
}

// BitmapsExtension locates the persistent dirty bitmap directory.
type BitmapsExtension struct {
	NbBitmaps       uint32
	DirectorySize   uint64
	DirectoryOffset uint64
}

// CryptoHeaderExtension locates the LUKS header of an encrypted image.
type CryptoHeaderExtension struct {
	Offset uint64
	Length uint64
}

// Snapshot is one internal snapshot table entry.
type Snapshot struct {
	ID            string
	Name          string
	L1TableOffset uint64
	L1Size        uint32
	DateSec       uint32
	DateNsec      uint32
	VMClockNsec   uint64
	// VMStateSize is the large (64-bit) size when the entry has it.
	VMStateSize uint64
	// DiskSize is the virtual size when the snapshot was taken; older
	// entries do not record it and QEMU assumes the current size.
	DiskSize uint64
	// ICount is the instruction count for record/replay, nil when absent.
	ICount *uint64
}

// ClusterSize in bytes.
func (h *Header) ClusterSize() uint64 { return 1 << h.ClusterBits }

// RefcountBits is the width of a refcount entry.
func (h *Header) RefcountBits() uint32 { return 1 << h.RefcountOrder }

func (h *Header) Dirty() bool         { return h.IncompatibleFeatures&IncompatDirty != 0 }
func (h *Header) Corrupt() bool       { return h.IncompatibleFeatures&IncompatCorrupt != 0 }
func (h *Header) ExtendedL2() bool    { return h.IncompatibleFeatures&IncompatExtendedL2 != 0 }
func (h *Header) LazyRefcounts() bool { return h.CompatibleFeatures&CompatLazyRefcounts != 0 }
func (h *Header) Encrypted() bool     { return h.CryptMethod != CryptNone }

// HasDataFile reports an external data file, named or not: the guest's data
// is then somewhere the header only points at.
func (h *Header) HasDataFile() bool { return h.IncompatibleFeatures&IncompatDataFile != 0 }

// Compat is the compat level qemu-img reports: "0.10" for v2, "1.1" for v3.
func (h *Header) Compat() string {
	if h.Version == 2 {
		return "0.10"
	}
	return "1.1"
}

// CompressionName is the compression type as qemu-img names it.
func (h *Header) CompressionName() string {
	if h.CompressionType == CompressionZstd {
		return "zstd"
	}
	return "zlib"
}

func be16(b []byte) uint16 { return binary.BigEndian.Uint16(b) }
func be32(b []byte) uint32 { return binary.BigEndian.Uint32(b) }
func be64(b []byte) uint64 { return binary.BigEndian.Uint64(b) }

func invalid(format string, args ...any) error {
	return fmt.Errorf("%w: "+format, append([]any{ErrInvalidImage}, args...)...)
}

// ParseHeader reads a qcow2 header, its extensions, backing reference and
// snapshot table. It refuses an image it cannot safely interpret: unknown
// incompatible features (ErrUnsupported), the corrupt bit (ErrCorrupt) and
// anything outside QEMU's own bounds or past the end of the file
// (ErrInvalidImage). Work and memory are bounded by QEMU's limits (the
// first cluster, at most 2 MiB; a snapshot table of at most 64 MiB) and by
// what the file really holds, never by what the header claims: a length
// that runs past the end of r costs only the bytes r has.
func ParseHeader(r io.ReaderAt) (*Header, error) {
	h, err := parseHeader(r, make([]byte, firstReadSize))
	if err != nil {
		return nil, err
	}
	if _, err := h.readSnapshots(r, maxSnapshotTableSize); err != nil {
		return nil, err
	}
	return h, nil
}

// parseHeader reads everything but the snapshot table into buf
// (firstReadSize bytes), which the caller may reuse afterwards: everything
// the Header keeps is copied out of it. The table's count and offset are
// checked, since that costs nothing; reading it is the caller's choice.
func parseHeader(r io.ReaderAt, buf []byte) (*Header, error) {
	n, err := r.ReadAt(buf, 0)
	if err != nil && err != io.EOF {
		return nil, err
	}
	buf = buf[:n]
	if n < v2HeaderLength {
		return nil, invalid("file too short for a qcow2 header (%d bytes)", n)
	}
	if [4]byte(buf[0:4]) != qcow2Magic {
		return nil, invalid("not a qcow2 image")
	}
	h := &Header{
		Version:               be32(buf[4:]),
		BackingFileOffset:     be64(buf[8:]),
		BackingFileSize:       be32(buf[16:]),
		ClusterBits:           be32(buf[20:]),
		VirtualSize:           be64(buf[24:]),
		CryptMethod:           be32(buf[32:]),
		L1Size:                be32(buf[36:]),
		L1TableOffset:         be64(buf[40:]),
		RefcountTableOffset:   be64(buf[48:]),
		RefcountTableClusters: be32(buf[56:]),
		NbSnapshots:           be32(buf[60:]),
		SnapshotsOffset:       be64(buf[64:]),
	}
	if h.Version != 2 && h.Version != 3 {
		return nil, fmt.Errorf("%w: qcow2 version %d", ErrUnsupported, h.Version)
	}
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return nil, invalid("cluster bits %d outside [%d, %d]", h.ClusterBits, minClusterBits, maxClusterBits)
	}
	clusterSize := h.ClusterSize()
	if h.Version == 2 {
		h.RefcountOrder = 4
		h.HeaderLength = v2HeaderLength
	} else {
		if n < minV3HeaderLength {
			return nil, invalid("file too short for a v3 header (%d bytes)", n)
		}
		h.IncompatibleFeatures = be64(buf[72:])
		h.CompatibleFeatures = be64(buf[80:])
		h.AutoclearFeatures = be64(buf[88:])
		h.RefcountOrder = be32(buf[96:])
		h.HeaderLength = be32(buf[100:])
		if h.HeaderLength < minV3HeaderLength || uint64(h.HeaderLength) > clusterSize || h.HeaderLength%8 != 0 {
			return nil, invalid("header length %d", h.HeaderLength)
		}
		if h.RefcountOrder > 6 {
			return nil, invalid("refcount order %d", h.RefcountOrder)
		}
	}
	if unknown := h.IncompatibleFeatures &^ knownIncompat; unknown != 0 {
		return nil, fmt.Errorf("%w: unknown incompatible features %#x", ErrUnsupported, unknown)
	}
	if h.Corrupt() {
		return nil, ErrCorrupt
	}
	if h.CryptMethod > CryptLUKS {
		return nil, invalid("encryption method %d", h.CryptMethod)
	}

	// The first cluster holds the header, its extensions and (by QEMU's
	// layout) the backing name; the first read almost always covers them
	// all, and more is read only as far as the extensions really go.
	p := &prefix{r: r, buf: buf, eof: n < firstReadSize}
	if h.BackingFileOffset != 0 {
		if h.BackingFileOffset > clusterSize || uint64(h.BackingFileSize) > min(maxBackingNameLen, clusterSize-h.BackingFileOffset) {
			return nil, invalid("backing name at %d length %d", h.BackingFileOffset, h.BackingFileSize)
		}
		end := h.BackingFileOffset + uint64(h.BackingFileSize)
		if err := p.ensure(end); err != nil {
			return nil, err
		}
		if uint64(len(p.buf)) < end {
			return nil, invalid("backing name past the end of the file")
		}
		h.BackingFile = string(p.buf[h.BackingFileOffset:end])
	}
	if err := p.ensure(uint64(h.HeaderLength)); err != nil {
		return nil, err
	}
	if uint64(len(p.buf)) < uint64(h.HeaderLength) {
		return nil, invalid("file ends inside the %d-byte header", h.HeaderLength)
	}
	if h.Version == 3 && h.HeaderLength > minV3HeaderLength {
		h.CompressionType = p.buf[104]
	}
	if err := h.checkCompression(); err != nil {
		return nil, err
	}
	extEnd := clusterSize
	if h.BackingFileOffset != 0 {
		extEnd = h.BackingFileOffset
	}
	if err := h.parseExtensions(p, extEnd); err != nil {
		return nil, err
	}
	if err := h.checkSnapshotTable(); err != nil {
		return nil, err
	}
	return h, nil
}

// prefix is the start of the file, read lazily up to the first cluster.
type prefix struct {
	r   io.ReaderAt
	buf []byte
	eof bool
}

// ensure reads until the prefix holds n bytes or the file ends. The
// buffer at most doubles per read, so a claim past the end of a small
// file costs about twice what the file holds, not what was claimed.
func (p *prefix) ensure(n uint64) error {
	for uint64(len(p.buf)) < n && !p.eof {
		grown := make([]byte, min(n, 2*uint64(len(p.buf))))
		copy(grown, p.buf)
		m, err := p.r.ReadAt(grown[len(p.buf):], int64(len(p.buf)))
		if err != nil && err != io.EOF {
			return err
		}
		p.buf = grown[:len(p.buf)+m]
		p.eof = len(p.buf) < len(grown)
	}
	return nil
}

func (h *Header) checkCompression() error {
	switch h.CompressionType {
	case CompressionZlib:
		if h.IncompatibleFeatures&IncompatCompression != 0 {
			return invalid("compression type bit set for zlib")
		}
	case CompressionZstd:
		if h.IncompatibleFeatures&IncompatCompression == 0 {
			return invalid("zstd compression without its incompatible bit")
		}
	default:
		return fmt.Errorf("%w: compression type %d", ErrUnsupported, h.CompressionType)
	}
	return nil
}

// parseExtensions walks the extension area that QEMU reads: from the end
// of the header to the backing name (or the end of the first cluster).
func (h *Header) parseExtensions(p *prefix, end uint64) error {
	off := uint64(h.HeaderLength)
	for off+8 <= end {
		if err := p.ensure(off + 8); err != nil {
			return err
		}
		if uint64(len(p.buf)) < off+8 {
			return nil // the file ends inside the extension area: no more extensions
		}
		typ, length := be32(p.buf[off:]), uint64(be32(p.buf[off+4:]))
		off += 8
		if typ == extTerminator {
			return nil
		}
		if length > end-off {
			return invalid("header extension %#x at %d: length %d past the extension area", typ, off-8, length)
		}
		if err := p.ensure(off + length); err != nil {
			return err
		}
		if uint64(len(p.buf)) < off+length {
			return invalid("header extension %#x at %d: past the end of the file", typ, off-8)
		}
		data := p.buf[off : off+length]
		switch typ {
		case extBackingFormat:
			// QEMU keeps the format name in a 16-byte buffer.
			if length >= 16 {
				return invalid("backing format extension of %d bytes", length)
			}
			h.BackingFormat = string(data)
		case extFeatureNames:
			for i := uint64(0); i+featureNameEntryLen <= length; i += featureNameEntryLen {
				e := data[i : i+featureNameEntryLen]
				h.FeatureNames = append(h.FeatureNames, FeatureName{
					Type: FeatureType(e[0]), Bit: e[1], Name: cString(e[2:]),
				})
			}
		case extBitmaps:
			if length != 24 {
				return invalid("bitmaps extension of %d bytes", length)
			}
			if h.AutoclearFeatures&AutoclearBitmaps != 0 {
				h.Bitmaps = &BitmapsExtension{NbBitmaps: be32(data), DirectorySize: be64(data[8:]), DirectoryOffset: be64(data[16:])}
			}
		case extCryptoHeader:
			if length != 16 {
				return invalid("crypto header extension of %d bytes", length)
			}
			h.CryptoHeader = &CryptoHeaderExtension{Offset: be64(data), Length: be64(data[8:])}
		case extDataFile:
			h.DataFile = string(data)
		}
		off += (length + 7) &^ 7
	}
	return nil
}

func cString(b []byte) string {
	for i, c := range b {
		if c == 0 {
			return string(b[:i])
		}
	}
	return string(b)
}

// checkSnapshotTable refuses a table count or offset QEMU would refuse.
func (h *Header) checkSnapshotTable() error {
	if h.NbSnapshots == 0 {
		return nil
	}
	if h.NbSnapshots > maxSnapshots {
		return invalid("%d snapshots (at most %d)", h.NbSnapshots, maxSnapshots)
	}
	if h.SnapshotsOffset%h.ClusterSize() != 0 || h.SnapshotsOffset == 0 || h.SnapshotsOffset > 1<<62 {
		return invalid("snapshot table offset %#x", h.SnapshotsOffset)
	}
	return nil
}

// snapshotReadSize is the read size through the table: small, since a
// real table is a few KiB and a hostile one must not cost a big buffer.
const snapshotReadSize = 4096

// readSnapshots reads the table entry by entry, fills h.Snapshots and
// returns the table's size in bytes. Each entry's size is checked against
// limit (at most maxSnapshotTableSize) before its variable part is read,
// so no more than limit bytes are ever read; past QEMU's own bound the
// image is invalid, past a smaller limit the error wraps ErrTooLarge.
// Memory grows only with the bytes really read: a length the file does
// not hold ends the read at the end of the file.
func (h *Header) readSnapshots(r io.ReaderAt, limit uint64) (uint64, error) {
	if h.NbSnapshots == 0 {
		return 0, nil
	}
	br := bufio.NewReaderSize(io.NewSectionReader(r, int64(h.SnapshotsOffset), maxSnapshotTableSize), snapshotReadSize)
	h.Snapshots = make([]Snapshot, 0, min(h.NbSnapshots, 64))
	var fixed [snapshotEntryFixed]byte
	var extra [maxSnapshotExtraData]byte
	var strs []byte
	var tableSize uint64
	for i := uint32(0); i < h.NbSnapshots; i++ {
		if tableSize+snapshotEntryFixed > limit {
			return 0, tableTooLarge(limit)
		}
		if _, err := io.ReadFull(br, fixed[:]); err != nil {
			return 0, snapshotReadErr(i, err)
		}
		s := Snapshot{
			L1TableOffset: be64(fixed[0:]),
			L1Size:        be32(fixed[8:]),
			DateSec:       be32(fixed[16:]),
			DateNsec:      be32(fixed[20:]),
			VMClockNsec:   be64(fixed[24:]),
			VMStateSize:   uint64(be32(fixed[32:])),
			DiskSize:      h.VirtualSize,
		}
		idLen, nameLen := int(be16(fixed[12:])), int(be16(fixed[14:]))
		extraLen := be32(fixed[36:])
		if extraLen > maxSnapshotExtraData {
			return 0, invalid("snapshot %d: %d bytes of extra data", i, extraLen)
		}
		entry := uint64(snapshotEntryFixed) + uint64(extraLen) + uint64(idLen+nameLen)
		pad := (8 - entry%8) % 8
		tableSize += entry + pad
		if tableSize > limit {
			return 0, tableTooLarge(limit)
		}
		if _, err := io.ReadFull(br, extra[:extraLen]); err != nil {
			return 0, snapshotReadErr(i, err)
		}
		if extraLen >= 8 {
			s.VMStateSize = be64(extra[0:])
		}
		if extraLen >= 16 {
			s.DiskSize = be64(extra[8:])
		}
		if extraLen >= 24 {
			if ic := be64(extra[16:]); ic != ^uint64(0) {
				s.ICount = &ic
			}
		}
		var err error
		if strs, err = readGrowing(br, strs[:0], idLen+nameLen); err != nil {
			return 0, snapshotReadErr(i, err)
		}
		s.ID, s.Name = string(strs[:idLen]), string(strs[idLen:])
		if i+1 < h.NbSnapshots {
			if _, err := br.Discard(int(pad)); err != nil {
				return 0, snapshotReadErr(i, err)
			}
		}
		h.Snapshots = append(h.Snapshots, s)
	}
	return tableSize, nil
}

func tableTooLarge(limit uint64) error {
	if limit >= maxSnapshotTableSize {
		return invalid("snapshot table larger than %d bytes", maxSnapshotTableSize)
	}
	return ErrTooLarge // the caller knows which budget ran out
}

// readGrowing appends n bytes from br to buf one buffered chunk at a time,
// so buf grows with the bytes that arrive rather than with n.
func readGrowing(br *bufio.Reader, buf []byte, n int) ([]byte, error) {
	for want := len(buf) + n; len(buf) < want; {
		chunk, err := br.Peek(min(want-len(buf), br.Size()))
		buf = append(buf, chunk...)
		_, _ = br.Discard(len(chunk)) // cannot fail: the bytes are buffered
		if err != nil {
			return buf, err
		}
	}
	return buf, nil
}

func snapshotReadErr(i uint32, err error) error {
	if err == io.EOF || err == io.ErrUnexpectedEOF {
		return invalid("snapshot table truncated at entry %d", i)
	}
	return fmt.Errorf("reading snapshot %d: %w", i, err)
}

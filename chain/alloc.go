package chain

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"syscall"
)

// L1 and L2 entry bits (qcow2 spec).
const (
	l2Compressed  uint64 = 1 << 62
	l2ZeroFlag    uint64 = 1 << 0
	offsetMask    uint64 = 0x00fffffffffffe00
	maxL1Bytes           = 32 << 20 // QEMU's QCOW_MAX_L1_SIZE
	subclusters          = 32
	extL2EntryLen        = 16
	stdL2EntryLen        = 8
)

// AllocatedBytes is the guest data a qcow2 image holds itself, not its
// backing chain: what `qemu-img map` reports as data at depth 0, read
// from the L1 and L2 tables instead of by a process that needs the
// image's lock. Zero clusters count as no data. Work is bounded by the
// virtual size: an L1 table larger than it needs is refused.
func AllocatedBytes(r io.ReaderAt, h *Header) (int64, error) {
	cs := h.ClusterSize()
	entryLen := uint64(stdL2EntryLen)
	if h.ExtendedL2() {
		entryLen = extL2EntryLen
	}
	perL2 := cs / entryLen
	clusters := (h.VirtualSize + cs - 1) / cs
	needL1 := (clusters + perL2 - 1) / perL2
	if uint64(h.L1Size) < needL1 || uint64(h.L1Size)*8 > maxL1Bytes {
		return 0, invalid("L1 table of %d entries for %d clusters", h.L1Size, clusters)
	}
	l1 := bufio.NewReaderSize(io.NewSectionReader(r, int64(h.L1TableOffset), int64(needL1)*8), 64<<10)
	l2 := make([]byte, cs)
	var total int64
	var e [8]byte
	for i := uint64(0); i < needL1; i++ {
		if _, err := io.ReadFull(l1, e[:]); err != nil {
			return 0, invalid("L1 table truncated at entry %d", i)
		}
		l2off := be64(e[:]) & offsetMask
		if l2off == 0 {
			continue
		}
		if _, err := r.ReadAt(l2, int64(l2off)); err != nil {
			return 0, invalid("L2 table at %#x: %v", l2off, err)
		}
		for j := uint64(0); j < perL2; j++ {
			guest := (i*perL2 + j) * cs
			if guest >= h.VirtualSize {
				break
			}
			size := min(cs, h.VirtualSize-guest)
			total += int64(entryData(l2[j*entryLen:], h.ExtendedL2(), size, cs))
		}
	}
	return total, nil
}

// entryData is how many bytes of one guest cluster (size bytes of it in
// the image) an L2 entry says hold data.
func entryData(entry []byte, extended bool, size, cs uint64) uint64 {
	v := be64(entry)
	if v&l2Compressed != 0 {
		return size
	}
	if !extended {
		if v&offsetMask == 0 || v&l2ZeroFlag != 0 {
			return 0
		}
		return size
	}
	// Extended L2: the bitmap's low half marks allocated subclusters.
	alloc := be64(entry[8:]) & 0xffffffff
	sub := cs / subclusters
	var n uint64
	for k := uint64(0); k < subclusters && k*sub < size; k++ {
		if alloc&(1<<k) != 0 {
			n += min(sub, size-k*sub)
		}
	}
	return n
}

// Allocated opens an image and returns the data it holds itself: for
// qcow2 from its tables, for raw the file's allocated blocks.
func Allocated(path string, format Format) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	switch format {
	case FormatRaw:
		st, err := f.Stat()
		if err != nil {
			return 0, err
		}
		if sys, ok := st.Sys().(*syscall.Stat_t); ok {
			return min(sys.Blocks*512, st.Size()), nil
		}
		return st.Size(), nil
	case FormatQcow2:
		h, err := ParseHeader(f)
		if err != nil {
			return 0, &ImageError{Path: path, Err: err}
		}
		n, err := AllocatedBytes(f, h)
		if err != nil {
			return 0, &ImageError{Path: path, Err: err}
		}
		return n, nil
	}
	return 0, fmt.Errorf("%w: format %q", ErrUnsupported, format)
}

package chain

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// DefaultMaxDepth bounds a chain when the policy sets no depth. Real chains
// are far shorter; the bound is there so a crafted chain cannot run forever.
const DefaultMaxDepth = 1000

// DefaultMaxSnapshotBytes bounds the snapshot tables one walk reads when
// the policy sets no bound: room for about 50,000 entries with short
// names, yet at most about 100,000 entries (40 bytes each at least) and
// some 25 MiB of memory, however many layers carry QEMU's 64 MiB each.
const DefaultMaxSnapshotBytes = 4 << 20

// Policy says which images a chain may reach. Its zero value is the strict
// default: backing files inside the top image's folder, formats named, no
// protocols, no external data files.
type Policy struct {
	// Roots are folders every image of the chain must resolve into, after
	// symlinks. Empty means the folder of the top image.
	Roots []string
	// AllowProbe lets a backing reference without a backing format be
	// opened with its format guessed from its content.
	AllowProbe bool
	// AllowProtocol accepts json: and protocol (nbd:, http:, ...)
	// references; the chain then ends at the image holding one, since
	// nothing beyond it is a local file to read.
	AllowProtocol bool
	// AllowDataFile accepts qcow2 images with an external data file, which
	// must then resolve inside the roots too.
	AllowDataFile bool
	// MaxDepth bounds the number of layers; 0 means DefaultMaxDepth.
	MaxDepth int
	// Snapshots reads each qcow2 layer's internal snapshot table into
	// Layer.Qcow2.Snapshots. Without it the tables are not read, only
	// their count and offset checked: following backing references does
	// not need them, and a hostile table is the costliest part of a layer.
	Snapshots bool
	// MaxSnapshotBytes bounds the snapshot-table bytes read over the whole
	// chain when Snapshots is set; 0 means DefaultMaxSnapshotBytes. Past it
	// Walk fails with an *ImageError wrapping ErrTooLarge.
	MaxSnapshotBytes int64
}

// Layer is one image of a chain.
type Layer struct {
	// Path is the image's name as QEMU forms it: the top as given (made
	// absolute), a backing reference joined to its referrer's folder.
	Path string
	// RealPath is Path with every symlink resolved; the roots apply to it.
	RealPath string
	Format   Format
	// VirtualSize is the guest-visible size in bytes.
	VirtualSize uint64
	// BackingRef and BackingFormat are what this image declares, verbatim.
	BackingRef    string
	BackingFormat string
	// Qcow2 is the full header of a qcow2 layer, nil for raw.
	Qcow2 *Header
}

// Snapshots lists the internal snapshots of a qcow2 layer; nil unless the
// walk's policy set Snapshots.
func (l *Layer) Snapshots() []Snapshot {
	if l.Qcow2 == nil {
		return nil
	}
	return l.Qcow2.Snapshots
}

// Chain is a backing chain, top (the active layer) first.
type Chain struct {
	Layers []Layer
}

// Top is the active layer.
func (c *Chain) Top() *Layer { return &c.Layers[0] }

// Base is the bottom layer that was read.
func (c *Chain) Base() *Layer { return &c.Layers[len(c.Layers)-1] }

// Walk reads the chain that starts at path. An empty format means the top
// image's format is detected: the caller named that file itself. Every
// backing reference is checked against the policy before the file it names
// is opened; refusals are *BackingError or *ImageError values wrapping the
// sentinels of this package.
func Walk(ctx context.Context, path string, format Format, p Policy) (*Chain, error) {
	w, err := newWalker(path, p)
	if err != nil {
		return nil, err
	}
	defer w.close()
	top, err := filepath.Abs(path)
	if err != nil {
		return nil, err
	}
	c := &Chain{}
	cur, curFormat, referrer, ref := top, format, "", ""
	for {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if len(c.Layers) >= w.maxDepth {
			return nil, &BackingError{Image: referrer, Reference: c.Base().BackingRef, Err: ErrTooDeep}
		}
		layer, err := w.open(cur, curFormat, referrer, ref)
		if err != nil {
			return nil, err
		}
		c.Layers = append(c.Layers, layer)
		if layer.BackingRef == "" {
			return c, nil
		}
		if hasProtocol(layer.BackingRef) {
			if !p.AllowProtocol {
				return nil, &BackingError{Image: layer.Path, Reference: layer.BackingRef, Err: ErrProtocol}
			}
			return c, nil
		}
		curFormat = Format(layer.BackingFormat)
		if curFormat == "" && !p.AllowProbe {
			return nil, &BackingError{Image: layer.Path, Reference: layer.BackingRef, Err: ErrNoBackingFormat}
		}
		if curFormat != "" {
			if _, err := ParseFormat(string(curFormat)); err != nil {
				return nil, &BackingError{Image: layer.Path, Reference: layer.BackingRef, Err: err}
			}
		}
		cur, referrer, ref = ResolveBacking(layer.Path, layer.BackingRef), layer.Path, layer.BackingRef
	}
}

// ResolveBacking joins a relative reference to the referring image's folder
// the way QEMU does: textually, without cleaning, so ".." is left for the
// kernel to resolve after any symlink, exactly as QEMU's open would.
func ResolveBacking(image, ref string) string {
	if strings.HasPrefix(ref, "/") {
		return ref
	}
	i := strings.LastIndexByte(image, '/')
	return image[:i+1] + ref
}

// hasProtocol mirrors QEMU's path_has_protocol: a colon before any slash.
func hasProtocol(ref string) bool {
	i := strings.IndexAny(ref, ":/")
	return i >= 0 && ref[i] == ':'
}

type fileID struct{ dev, ino uint64 }

// folder is a resolved folder of the chain, opened (O_PATH) only once an
// image inside the roots is to be read from it.
type folder struct {
	real string
	fd   int
}

type walker struct {
	roots    []string
	p        Policy
	maxDepth int
	seen     map[fileID]bool
	folders  map[string]*folder
	buf      []byte
	// tableMax is the snapshot-table bytes the walk may read, tableLeft
	// what remains of them.
	tableMax, tableLeft uint64
}

func newWalker(top string, p Policy) (*walker, error) {
	roots := p.Roots
	if len(roots) == 0 {
		abs, err := filepath.Abs(top)
		if err != nil {
			return nil, err
		}
		roots = []string{filepath.Dir(abs)}
	}
	w := &walker{p: p, maxDepth: p.MaxDepth, seen: map[fileID]bool{}, folders: map[string]*folder{}, buf: make([]byte, firstReadSize)}
	if w.maxDepth <= 0 {
		w.maxDepth = DefaultMaxDepth
	}
	w.tableMax = DefaultMaxSnapshotBytes
	if p.MaxSnapshotBytes > 0 {
		w.tableMax = uint64(p.MaxSnapshotBytes)
	}
	w.tableLeft = w.tableMax
	for _, r := range roots {
		abs, err := filepath.Abs(r)
		if err != nil {
			return nil, err
		}
		real, err := filepath.EvalSymlinks(abs)
		if err != nil {
			return nil, fmt.Errorf("policy root %s: %w", r, err)
		}
		w.roots = append(w.roots, real)
	}
	return w, nil
}

func (w *walker) close() {
	for _, f := range w.folders {
		if f.fd >= 0 {
			unix.Close(f.fd)
		}
	}
}

func (w *walker) inRoots(real string) bool {
	for _, r := range w.roots {
		if real == r || strings.HasPrefix(real, r+"/") || r == "/" {
			return true
		}
	}
	return false
}

// folder resolves a folder's symlinks once per walk: the layers of a chain
// nearly always share one folder.
func (w *walker) folder(dir string) (*folder, error) {
	if f, ok := w.folders[dir]; ok {
		return f, nil
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, err
	}
	f := &folder{real: real, fd: -1}
	w.folders[dir] = f
	return f, nil
}

// openImage opens path for reading once its real location is known to be
// inside the roots. The common case costs one openat of one component:
// the folder is already resolved, and O_NOFOLLOW proves the name itself is
// not a symlink; a symlinked name takes the slow path through EvalSymlinks.
func (w *walker) openImage(path string) (fd int, real string, err error) {
	i := strings.LastIndexByte(path, '/')
	dir, base := path[:i], path[i+1:]
	if dir == "" {
		dir = "/"
	}
	if base == "" || base == "." || base == ".." {
		return w.openResolved(path)
	}
	f, err := w.folder(dir)
	if err != nil {
		return -1, "", err
	}
	real = f.real + "/" + base
	if f.real == "/" {
		real = "/" + base
	}
	if !w.inRoots(real) {
		return -1, real, ErrOutsideRoots
	}
	if f.fd < 0 {
		if f.fd, err = unix.Open(f.real, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0); err != nil {
			return -1, real, &fs.PathError{Op: "open", Path: f.real, Err: err}
		}
	}
	fd, err = unix.Openat(f.fd, base, imageOpenFlags, 0)
	if err == unix.ELOOP {
		return w.openResolved(real)
	}
	if err != nil {
		return -1, real, &fs.PathError{Op: "open", Path: real, Err: err}
	}
	return fd, real, nil
}

// O_NONBLOCK so that a FIFO planted in a pool cannot hang the walk; the
// type check after fstat refuses it.
const imageOpenFlags = unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC | unix.O_NONBLOCK

func (w *walker) openResolved(path string) (int, string, error) {
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		return -1, "", err
	}
	if !w.inRoots(real) {
		return -1, real, ErrOutsideRoots
	}
	fd, err := unix.Open(real, imageOpenFlags, 0)
	if err != nil {
		return -1, real, &fs.PathError{Op: "open", Path: real, Err: err}
	}
	return fd, real, nil
}

// open checks path against the policy, then reads its header. The referrer
// is the image whose reference ref named path ("" for the top).
func (w *walker) open(path string, format Format, referrer, ref string) (Layer, error) {
	refErr := func(err error) error {
		if referrer == "" {
			return &ImageError{Path: path, Err: err}
		}
		return &BackingError{Image: referrer, Reference: ref, Err: err}
	}
	fd, real, err := w.openImage(path)
	switch {
	case errors.Is(err, ErrOutsideRoots):
		return Layer{}, refErr(fmt.Errorf("%w (%s)", ErrOutsideRoots, real))
	case errors.Is(err, fs.ErrNotExist):
		if !w.inRoots(filepath.Clean(path)) {
			return Layer{}, refErr(ErrOutsideRoots)
		}
		return Layer{}, refErr(fmt.Errorf("%w: %w", ErrChainBroken, err))
	case err != nil:
		return Layer{}, refErr(err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Layer{}, refErr(&fs.PathError{Op: "fstat", Path: real, Err: err})
	}
	if kind := st.Mode & unix.S_IFMT; kind != unix.S_IFREG && kind != unix.S_IFBLK {
		return Layer{}, refErr(fmt.Errorf("%w: not a regular file or block device", ErrInvalidImage))
	}
	id := fileID{dev: st.Dev, ino: st.Ino}
	if w.seen[id] {
		return Layer{}, refErr(ErrLoop)
	}
	w.seen[id] = true

	r := fdReader(fd)
	if format == "" {
		if format, err = Detect(r); err != nil {
			return Layer{}, &ImageError{Path: path, Err: err}
		}
	}
	layer := Layer{Path: path, RealPath: real, Format: format}
	switch format {
	case FormatRaw:
		size, err := unix.Seek(fd, 0, 2)
		if err != nil {
			return Layer{}, &ImageError{Path: path, Err: err}
		}
		layer.VirtualSize = rawVirtualSize(size)
	case FormatQcow2:
		h, err := parseHeader(r, w.buf)
		if err != nil {
			return Layer{}, &ImageError{Path: path, Err: err}
		}
		if h.HasDataFile() {
			if err := w.checkDataFile(path, h); err != nil {
				return Layer{}, err
			}
		}
		if w.p.Snapshots {
			if err := w.readSnapshots(r, h); err != nil {
				return Layer{}, &ImageError{Path: path, Err: err}
			}
		}
		layer.Qcow2 = h
		layer.VirtualSize = h.VirtualSize
		layer.BackingRef = h.BackingFile
		layer.BackingFormat = h.BackingFormat
	default:
		return Layer{}, &ImageError{Path: path, Err: fmt.Errorf("%w: format %q", ErrUnsupported, format)}
	}
	return layer, nil
}

// sectorSize is the unit QEMU's block layer counts a device's length in.
const sectorSize = 512

// rawVirtualSize is the size QEMU gives a guest (and qemu-img info reports
// as virtual-size) for a raw file of size bytes: the block layer keeps a
// length as a count of 512-byte sectors rounded up (block.c,
// bdrv_refresh_total_sectors: DIV_ROUND_UP(length, BDRV_SECTOR_SIZE)), so
// a file of 196,616 bytes is a disk of 197,120, its tail reading as zeros.
// An overlay made on it, or a size compared with qemu-img's, must see the
// same number.
func rawVirtualSize(size int64) uint64 {
	return (uint64(size) + sectorSize - 1) / sectorSize * sectorSize
}

// readSnapshots reads a layer's snapshot table within what is left of the
// walk's budget, never more than QEMU's own bound for one image.
func (w *walker) readSnapshots(r io.ReaderAt, h *Header) error {
	n, err := h.readSnapshots(r, min(w.tableLeft, maxSnapshotTableSize))
	if errors.Is(err, ErrTooLarge) {
		return fmt.Errorf("%w: the chain's snapshot tables pass %d bytes", ErrTooLarge, w.tableMax)
	}
	w.tableLeft -= n
	return err
}

// checkDataFile applies the policy to an external data file: the guest's
// data lives there, so it is as sensitive as a backing file.
func (w *walker) checkDataFile(path string, h *Header) error {
	if !w.p.AllowDataFile {
		return &ImageError{Path: path, Err: fmt.Errorf("%w: external data file %q", ErrUnsupported, h.DataFile)}
	}
	if h.DataFile == "" {
		return &ImageError{Path: path, Err: fmt.Errorf("%w: external data file without a name", ErrUnsupported)}
	}
	if hasProtocol(h.DataFile) {
		return &BackingError{Image: path, Reference: h.DataFile, Err: ErrProtocol}
	}
	// Resolved, never opened: QEMU opens the data file, this reader does not.
	real, err := filepath.EvalSymlinks(ResolveBacking(path, h.DataFile))
	if err != nil {
		return &BackingError{Image: path, Reference: h.DataFile, Err: err}
	}
	if !w.inRoots(real) {
		return &BackingError{Image: path, Reference: h.DataFile, Err: ErrOutsideRoots}
	}
	return nil
}

// fdReader reads with pread on a raw descriptor: an os.File would register
// with the poller, an extra syscall per layer for nothing on regular files.
type fdReader int

func (f fdReader) ReadAt(b []byte, off int64) (int, error) {
	total := 0
	for total < len(b) {
		n, err := unix.Pread(int(f), b[total:], off+int64(total))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return total, os.NewSyscallError("pread", err)
		}
		if n == 0 {
			return total, io.EOF
		}
		total += n
	}
	return total, nil
}

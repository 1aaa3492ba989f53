package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/internal/fsutil"
	"github.com/xlsnap/xlsnap/storage"
)

// DirSource is the embedded default domain source: a folder of libvirt
// domain XML files, NAME.xml each. Its domains are inactive.
type DirSource struct {
	dir string

	mu    sync.Mutex
	uuids map[string]uuidEntry // file name → its UUID, by stat
}

type uuidEntry struct {
	size  int64
	mtime time.Time
	uuid  string
}

// NewDirSource opens a folder of domain definitions (NAME.xml each).
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for a folder that is
// not there or not a folder.
func NewDirSource(dir string) (*DirSource, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidArg, err)
	}
	if st, err := os.Stat(abs); err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidArg, err)
	} else if !st.IsDir() {
		return nil, invalidf("%s is not a folder", abs)
	}
	return &DirSource{dir: abs}, nil
}

// URI is file:// and the folder.
func (s *DirSource) URI() string { return "file://" + s.dir }

// Dir is the folder the source reads.
func (s *DirSource) Dir() string { return s.dir }

func (s *DirSource) path(name string) (string, error) {
	if err := storage.ValidName("domain", name); err != nil {
		return "", err
	}
	return filepath.Join(s.dir, name+".xml"), nil
}

// Domain reads NAME.xml; a folder source's domains are always shut off.
// Relative disk paths are made absolute, against the folder.
//
// Errors: ErrInvalidArg (VIR_ERR_INVALID_ARG, 8) for a name that cannot
// be a file name; ErrNoDomain (VIR_ERR_NO_DOMAIN, 42) for no such file;
// ErrXML (VIR_ERR_XML_ERROR, 27) for a definition that does not parse or
// names another domain; ErrDuplicateUUID (VIR_ERR_OPERATION_FAILED, 9)
// when another file defines the same UUID, as libvirt refuses a second
// definition of one UUID.
func (s *DirSource) Domain(ctx context.Context, name string) (*SourceDomain, error) {
	p, err := s.path(name)
	if err != nil {
		return nil, err
	}
	doc, err := os.ReadFile(p)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s (no %s)", ErrNoDomain, name, p)
	}
	if err != nil {
		return nil, err
	}
	def, err := parseDomain(string(doc))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", p, err)
	}
	if def.Name != name {
		return nil, fmt.Errorf("%w: %s defines domain %q", ErrXML, p, def.Name)
	}
	if other, err := s.sameUUID(name, def.UUID); err != nil {
		return nil, err
	} else if other != "" {
		return nil, fmt.Errorf("%w: %s and %s both define uuid %s", ErrDuplicateUUID, p, other, def.UUID)
	}
	xmlDoc := string(doc)
	if absDisks(def, s.dir) {
		if xmlDoc, err = marshalDomain(def); err != nil {
			return nil, err
		}
	}
	return &SourceDomain{Name: name, State: StateShutoff, XML: xmlDoc}, nil
}

var uuidRE = regexp.MustCompile(`<uuid>\s*([^<\s]+)\s*</uuid>`)

// sameUUID names another definition in the folder with the given UUID,
// "" if none. Each file's UUID is read once per change (stat).
func (s *DirSource) sameUUID(name, uuid string) (string, error) {
	if uuid == "" {
		return "", nil
	}
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return "", err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.uuids == nil {
		s.uuids = map[string]uuidEntry{}
	}
	for _, e := range entries {
		n := e.Name()
		if n == name+".xml" || !strings.HasSuffix(n, ".xml") || strings.HasPrefix(n, ".") || !e.Type().IsRegular() {
			continue
		}
		st, err := e.Info()
		if err != nil {
			continue // gone since listed
		}
		ent, ok := s.uuids[n]
		if !ok || ent.size != st.Size() || !ent.mtime.Equal(st.ModTime()) {
			b, err := os.ReadFile(filepath.Join(s.dir, n))
			if err != nil {
				continue
			}
			ent = uuidEntry{size: st.Size(), mtime: st.ModTime()}
			if m := uuidRE.FindSubmatch(b); m != nil {
				ent.uuid = string(m[1])
			}
			s.uuids[n] = ent
		}
		if strings.EqualFold(ent.uuid, uuid) {
			return filepath.Join(s.dir, n), nil
		}
	}
	return "", nil
}

// absDisks makes every relative disk source file absolute against dir, the
// folder of the definition (what a relative path in a file means; the
// working folder of whoever runs xlsnap means nothing). It reports
// whether anything changed, so a definition without relative paths is
// handed on byte for byte.
func absDisks(def *libvirtxml.Domain, dir string) bool {
	if def.Devices == nil {
		return false
	}
	changed := false
	for i := range def.Devices.Disks {
		src := def.Devices.Disks[i].Source
		if src == nil || src.File == nil || src.File.File == "" || filepath.IsAbs(src.File.File) {
			continue
		}
		src.File.File = filepath.Join(dir, src.File.File)
		changed = true
	}
	return changed
}

// Domains lists the folder's definitions (NAME.xml files), sorted.
//
// Errors: the file system's own reading the folder.
func (s *DirSource) Domains(ctx context.Context) ([]string, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var names []string
	for _, e := range entries {
		if n, ok := strings.CutSuffix(e.Name(), ".xml"); ok && e.Type().IsRegular() {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	return names, nil
}

// Redefine writes the new definition under a temporary name, syncs it and
// renames it over the old one, so a crash leaves one or the other whole;
// the file keeps its mode and owner, and disk paths the old one named
// relatively stay relative.
//
// Errors: ErrInvalidArg (8) for a name that cannot be a file name;
// ErrNoDomain (42) for no such file; ErrXML (27) for a document that does
// not parse; the file system's own writing it.
func (s *DirSource) Redefine(ctx context.Context, name, doc string) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	old, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("%w: %s", ErrNoDomain, name)
	}
	if doc, err = s.keepRelative(p, doc); err != nil {
		return err
	}
	// The new file replaces the old one for whoever reads it: same mode,
	// same owner.
	return fsutil.WriteFile(p, []byte(doc), func(f *os.File) error {
		if err := f.Chmod(old.Mode().Perm()); err != nil {
			return err
		}
		if err := fsutil.SameOwner(f, old); err != nil {
			return fmt.Errorf("giving the new definition of %s the owner of %s: %w", name, p, err)
		}
		return nil
	})
}

// keepRelative writes the sources of disks that the definition at p
// named by a relative path relative again: the user's way of naming
// them, read against the folder.
func (s *DirSource) keepRelative(p, doc string) (string, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return "", err
	}
	var old libvirtxml.Domain
	if old.Unmarshal(string(b)) != nil || old.Devices == nil {
		return doc, nil // nothing to keep from a file that does not parse
	}
	rel := map[string]bool{}
	for _, d := range old.Devices.Disks {
		if d.Target != nil && d.Source != nil && d.Source.File != nil && d.Source.File.File != "" && !filepath.IsAbs(d.Source.File.File) {
			rel[d.Target.Dev] = true
		}
	}
	if len(rel) == 0 {
		return doc, nil
	}
	def, err := parseDomain(doc)
	if err != nil {
		return "", err
	}
	for i := range def.Devices.Disks {
		d := &def.Devices.Disks[i]
		if d.Target == nil || !rel[d.Target.Dev] || d.Source == nil || d.Source.File == nil {
			continue
		}
		if r, err := filepath.Rel(s.dir, d.Source.File.File); err == nil && filepath.IsAbs(d.Source.File.File) {
			d.Source.File.File = r
		}
	}
	return marshalDomain(def)
}

// StaleTemps lists the temporary definitions a crash inside Redefine
// left (".NAME.xml.*", untouched for age), removing them with remove.
//
// Errors: the file system's own reading the folder or removing a file.
func (s *DirSource) StaleTemps(age time.Duration, remove bool) ([]string, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		n := e.Name()
		if !e.Type().IsRegular() || !strings.HasPrefix(n, ".") || !strings.Contains(n, ".xml.") {
			continue
		}
		info, err := e.Info()
		if err != nil || time.Since(info.ModTime()) < age {
			continue
		}
		p := filepath.Join(s.dir, n)
		if remove {
			if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
				return out, err
			}
		}
		out = append(out, p)
	}
	return out, nil
}

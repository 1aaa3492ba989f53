package driver

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/xlsnap/xlsnap/internal/fsutil"
	"github.com/xlsnap/xlsnap/storage"
)

// DirSource is the embedded default domain source: a folder of libvirt
// domain XML files, NAME.xml each. Its domains are inactive.
type DirSource struct {
	dir string
}

// NewDirSource opens a folder of domain definitions.
func NewDirSource(dir string) (*DirSource, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, err
	}
	if st, err := os.Stat(abs); err != nil {
		return nil, err
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
	return &SourceDomain{Name: name, State: StateShutoff, XML: string(doc)}, nil
}

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
// renames it over the old one, so a crash leaves one or the other whole.
func (s *DirSource) Redefine(ctx context.Context, name, doc string) error {
	p, err := s.path(name)
	if err != nil {
		return err
	}
	if _, err := os.Stat(p); err != nil {
		return fmt.Errorf("%w: %s", ErrNoDomain, name)
	}
	tmp, err := os.CreateTemp(s.dir, "."+name+".xml.*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.WriteString(doc); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp.Name(), p); err != nil {
		return err
	}
	return fsutil.SyncDir(s.dir)
}

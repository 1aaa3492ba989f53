package serve

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/xlsnap/xlsnap/driver"
)

// fakeVanishingSource is a folder source that still lists a domain whose
// definition is gone, as a listing racing a removal sees it.
type fakeVanishingSource struct{ *driver.DirSource }

func (f fakeVanishingSource) Domains(ctx context.Context) ([]string, error) {
	names, err := f.DirSource.Domains(ctx)
	return append(names, "gone"), err
}

// TestListSkipsRemovedDomain: a domain removed between the listing and
// its lookup is left out, not a failure of the whole list.
func TestListSkipsRemovedDomain(t *testing.T) {
	dir := t.TempDir()
	doc := "<domain type='xen'><name>web</name><memory>262144</memory><os><type>linux</type></os></domain>"
	if err := os.WriteFile(filepath.Join(dir, "web.xml"), []byte(doc), 0o644); err != nil {
		t.Fatal(err)
	}
	src, err := driver.NewDirSource(dir)
	if err != nil {
		t.Fatal(err)
	}
	s := New(Config{Source: fakeVanishingSource{src}})
	doms, err := s.listDomains(context.Background(), 0)
	if err != nil || len(doms) != 1 || doms[0].ref.Name != "web" {
		t.Fatalf("list: %v, %d domains", err, len(doms))
	}
}

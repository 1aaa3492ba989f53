package chain_test

import (
	"bytes"
	"context"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/chain"
)

// seedImages are the committed images (hostile and golden) that seed the
// fuzz targets on top of the corpus under testdata/fuzz.
func seedImages(f *testing.F) [][]byte {
	f.Helper()
	var seeds [][]byte
	for _, dir := range []string{"testdata/hostile", "testdata/golden"} {
		entries, err := os.ReadDir(dir)
		if err != nil {
			f.Fatal(err)
		}
		for _, e := range entries {
			b, err := os.ReadFile(filepath.Join(dir, e.Name()))
			if err != nil {
				f.Fatal(err)
			}
			seeds = append(seeds, b)
		}
	}
	return seeds
}

func FuzzParseHeader(f *testing.F) {
	for _, s := range seedImages(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := chain.ParseHeader(bytes.NewReader(data))
		if err != nil {
			if h != nil {
				t.Fatal("header returned with an error")
			}
			if !errors.Is(err, chain.ErrInvalidImage) && !errors.Is(err, chain.ErrUnsupported) && !errors.Is(err, chain.ErrCorrupt) {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		if h.Version != 2 && h.Version != 3 {
			t.Fatalf("accepted version %d", h.Version)
		}
		if h.ClusterBits < 9 || h.ClusterBits > 21 {
			t.Fatalf("accepted cluster bits %d", h.ClusterBits)
		}
		if len(h.BackingFile) > 1023 || len(h.BackingFormat) >= 16 {
			t.Fatalf("accepted backing %d bytes, format %d bytes", len(h.BackingFile), len(h.BackingFormat))
		}
		if uint32(len(h.Snapshots)) != h.NbSnapshots {
			t.Fatalf("%d snapshots read, header says %d", len(h.Snapshots), h.NbSnapshots)
		}
		if h.Corrupt() {
			t.Fatal("accepted the corrupt bit")
		}
	})
}

// FuzzWalk lets the fuzzer write the top image and name its backing file:
// whatever it does, no layer may resolve outside the root, and every
// refusal must be typed. The walk reads snapshot tables within a budget a
// few entries can pass, so the budget's refusal is fuzzed too.
func FuzzWalk(f *testing.F) {
	for _, s := range seedImages(f) {
		f.Add(s, "base.qcow2", "qcow2")
	}
	for _, ref := range []string{"../outside/secret", "/etc/passwd", "link", "top.qcow2", "json:{}", "sub/../../outside/secret"} {
		f.Add(newCrafted().withBacking(ref, "raw").bytes(), ref, "raw")
	}
	base := newCrafted().bytes()
	f.Fuzz(func(t *testing.T, top []byte, ref, format string) {
		dir := t.TempDir()
		root, outside := filepath.Join(dir, "root"), filepath.Join(dir, "outside")
		for _, d := range []string{filepath.Join(root, "sub"), outside} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		files := map[string][]byte{
			filepath.Join(root, "top.qcow2"):  top,
			filepath.Join(root, "base.qcow2"): base,
			filepath.Join(outside, "secret"):  []byte("secret"),
		}
		for p, b := range files {
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		if err := os.Symlink(filepath.Join(outside, "secret"), filepath.Join(root, "link")); err != nil {
			t.Fatal(err)
		}
		// The fuzzer's reference, written into a header of its own.
		if !strings.ContainsRune(ref, 0) && len(ref) <= 1023 && len(format) < 16 {
			img := newCrafted().withBacking(ref, format).bytes()
			if err := os.WriteFile(filepath.Join(root, "sub", "ref.qcow2"), img, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		for _, start := range []string{"top.qcow2", "sub/ref.qcow2"} {
			c, err := chain.Walk(context.Background(), filepath.Join(root, start), "", chain.Policy{Roots: []string{root}, MaxDepth: 16, Snapshots: true, MaxSnapshotBytes: 4096})
			if err != nil {
				var ie *chain.ImageError
				var be *chain.BackingError
				if !errors.As(err, &ie) && !errors.As(err, &be) && !errors.Is(err, fs.ErrNotExist) {
					t.Fatalf("untyped error %v", err)
				}
				continue
			}
			if len(c.Layers) > 16 {
				t.Fatalf("%d layers past MaxDepth", len(c.Layers))
			}
			for _, l := range c.Layers {
				if !strings.HasPrefix(l.RealPath, root+"/") {
					t.Fatalf("layer %s resolved outside the root: %s", l.Path, l.RealPath)
				}
			}
		}
	})
}

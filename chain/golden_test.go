package chain_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/xlsnap/xlsnap/chain"
)

// goldenImages are small real images made once with qemu-img (512-byte
// clusters keep them tiny) and kept under testdata/golden: the parser is
// checked against the bytes qemu-img wrote, not only against images it
// writes on the day the test runs.
var goldenImages = []struct {
	name string
	make [][]string // qemu-img argument lists, run in the folder
}{
	{"v2.qcow2", [][]string{{"create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=512", "v2.qcow2", "4M"}}},
	{"v3-snapshots.qcow2", [][]string{
		{"create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "v3-snapshots.qcow2", "4M"},
		{"snapshot", "-c", "first", "v3-snapshots.qcow2"},
		{"snapshot", "-c", "second", "v3-snapshots.qcow2"},
	}},
	{"v3-backing.qcow2", [][]string{{"create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-F", "qcow2", "-b", "v2.qcow2", "v3-backing.qcow2"}}},
	{"v3-bitmaps-zstd.qcow2", [][]string{
		{"create", "-q", "-f", "qcow2", "-o", "cluster_size=512,compression_type=zstd", "v3-bitmaps-zstd.qcow2", "4M"},
		{"bitmap", "--add", "v3-bitmaps-zstd.qcow2", "dirty0"},
	}},
}

func TestGoldenImages(t *testing.T) {
	dir := filepath.Join("testdata", "golden")
	if *update {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		for _, g := range goldenImages {
			os.Remove(filepath.Join(dir, g.name))
			for _, args := range g.make {
				for i, a := range args {
					if a == g.name {
						args[i] = filepath.Join(dir, a)
					}
				}
				qemuImg(t, args...)
			}
		}
	}
	for _, g := range goldenImages {
		t.Run(g.name, func(t *testing.T) {
			abs, err := filepath.Abs(filepath.Join(dir, g.name))
			if err != nil {
				t.Fatal(err)
			}
			compareChain(t, abs, "qcow2", chain.Policy{})
		})
	}
}

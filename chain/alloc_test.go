package chain_test

import (
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/xlsnap/xlsnap/chain"
)

// qemuMapData sums what `qemu-img map` reports as data in the image itself.
func qemuMapData(t *testing.T, path, format string) int64 {
	t.Helper()
	var entries []struct {
		Length int64 `json:"length"`
		Depth  int   `json:"depth"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(qemuImg(t, "map", "--output=json", "-f", format, path)), &entries); err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range entries {
		if e.Data && e.Depth == 0 {
			n += e.Length
		}
	}
	return n
}

func TestAllocatedMatchesQemuImgMap(t *testing.T) {
	qemuIO := needTool(t, "qemu-io")
	cases := []struct {
		name   string
		opts   []string
		size   string
		writes []string
	}{
		{"empty", nil, "64M", nil},
		{"writes", nil, "64M", []string{"write -P 0x11 0 3M", "write -P 0x22 10M 64k", "write -P 0x33 63M 1M"}},
		{"zeroes", nil, "64M", []string{"write -P 0x11 0 4M", "write -z 1M 1M"}},
		{"small-clusters-odd-size", []string{"-o", "cluster_size=512"}, "10000k", []string{"write -P 0x44 0 7k", "write -P 0x44 9999k 1k"}},
		{"big-l1", []string{"-o", "cluster_size=4096"}, "1G", []string{"write -P 0x55 0 1M", "write -P 0x55 900M 1M"}},
		{"extended-l2", []string{"-o", "extended_l2=on"}, "64M", []string{"write -P 0x66 0 4k", "write -P 0x66 128k 70k"}},
		{"v2", []string{"-o", "compat=0.10"}, "64M", []string{"write -P 0x77 5M 2M"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			qemuImg(t, append(append([]string{"create", "-q", "-f", "qcow2"}, tc.opts...), p, tc.size)...)
			for _, w := range tc.writes {
				run(t, qemuIO, "-f", "qcow2", "-c", w, p)
			}
			got, err := chain.Allocated(p, chain.FormatQcow2)
			if err != nil {
				t.Fatal(err)
			}
			if want := qemuMapData(t, p, "qcow2"); got != want {
				t.Fatalf("allocated %d, qemu-img map says %d", got, want)
			}
		})
	}
	t.Run("compressed", func(t *testing.T) {
		dir := t.TempDir()
		src, dst := filepath.Join(dir, "src.raw"), filepath.Join(dir, "c.qcow2")
		qemuImg(t, "create", "-q", "-f", "raw", src, "8M")
		run(t, qemuIO, "-f", "raw", "-c", "write -P 0x88 0 2M", src)
		qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", src, dst)
		got, err := chain.Allocated(dst, chain.FormatQcow2)
		if want := qemuMapData(t, dst, "qcow2"); err != nil || got != want {
			t.Fatalf("compressed: %d (%v), qemu-img map says %d", got, err, want)
		}
	})
}

func TestAllocatedRefusesHostileL1(t *testing.T) {
	cr := newCrafted()
	cr.size = 1 << 20
	h := cr.bytes()
	hdr, err := chain.ParseHeader(bytesReader(h))
	if err != nil {
		t.Fatal(err)
	}
	hdr.L1Size = 1 << 30 // claims 8 GiB of L1 for a 1 MiB disk
	if _, err := chain.AllocatedBytes(bytesReader(h), hdr); err == nil {
		t.Fatal("an oversized L1 table was accepted")
	}
}

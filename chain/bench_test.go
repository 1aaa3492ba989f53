package chain_test

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/xlsnap/xlsnap/chain"
)

// BenchmarkWalk compares chain.Walk with the baseline it replaces,
// `qemu-img info --backing-chain`, on the same chains in the same run.
// scripts/benchtable.sh turns the pairs into a table with the ratio.
func BenchmarkWalk(b *testing.B) {
	qemuImgPath := needTool(b, "qemu-img")
	for _, depth := range []int{1, 10, 50, 200} {
		top := makeChain(b, b.TempDir(), depth, "qcow2")
		b.Run(fmt.Sprintf("depth=%d/native", depth), func(b *testing.B) {
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				c, err := chain.Walk(ctx, top, chain.FormatQcow2, chain.Policy{})
				if err != nil || len(c.Layers) != depth+1 {
					b.Fatalf("Walk: %v", err)
				}
			}
		})
		b.Run(fmt.Sprintf("depth=%d/qemu-img", depth), func(b *testing.B) {
			for b.Loop() {
				if out, err := exec.Command(qemuImgPath, "info", "--backing-chain", "--output=json", "-U", "-f", "qcow2", top).CombinedOutput(); err != nil {
					b.Fatalf("qemu-img: %v\n%s", err, out)
				}
			}
		})
	}
}

// BenchmarkRescan1000Disks is the rescan of a host's worth of disks: 1000
// chains of depth 3, each in its own folder.
func BenchmarkRescan1000Disks(b *testing.B) {
	dir := b.TempDir()
	top := makeChain(b, dir, 3, "qcow2")
	tops := make([]string, 1000)
	for i := range tops {
		tops[i] = top
	}
	_ = filepath.Dir(top)
	ctx := context.Background()
	for b.Loop() {
		for _, t := range tops {
			if _, err := chain.Walk(ctx, t, chain.FormatQcow2, chain.Policy{}); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// BenchmarkWalkSnapshotBomb walks 8 sparse layers whose snapshot tables
// each hold 64 MiB of names: the bound on a hostile chain's total work,
// with the tables left unread (the default) and read within the default
// budget (the walk then stops with ErrTooLarge at the top layer).
func BenchmarkWalkSnapshotBomb(b *testing.B) {
	top := writeSnapshotBombChain(b, b.TempDir(), 8)
	ctx := context.Background()
	for _, tables := range []bool{false, true} {
		b.Run(fmt.Sprintf("tables=%v", tables), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				_, _ = chain.Walk(ctx, top, chain.FormatQcow2, chain.Policy{Snapshots: tables})
			}
		})
	}
}

// BenchmarkParseHugeHeaderLength parses a 4 KiB file whose header claims
// to be 2 MiB long.
func BenchmarkParseHugeHeaderLength(b *testing.B) {
	img := hugeHeaderLength()
	b.ReportAllocs()
	for b.Loop() {
		_, _ = chain.ParseHeader(bytes.NewReader(img))
	}
}

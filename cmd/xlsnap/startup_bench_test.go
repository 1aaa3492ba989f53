package main

// The whole-process cost of reading a backing chain: xlsnap chain --json
// as make build builds bin/xlsnap, against qemu-img info --backing-chain
// on the same depth-50 qcow2 chain. Each sub-benchmark reports its median
// run as ns/op (a process's time is skewed by the odd slow start on a
// shared machine, which a mean would count); scripts/benchtable.sh pairs
// NAME/native with NAME/qemu-img and prints the ratio. The goal: at least
// 5×.

import (
	"fmt"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

const benchChainDepth = 50

func BenchmarkChainProcess(b *testing.B) {
	dir := b.TempDir()
	bin := buildLean(b, dir)
	top := ""
	for i := range benchChainDepth {
		p := filepath.Join(dir, fmt.Sprintf("l%02d.qcow2", i))
		args := []string{"create", "-q", "-f", "qcow2", p, "64M"}
		if top != "" {
			args = []string{"create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", top, p}
		}
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			b.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
		top = p
	}
	// Both must have read the whole chain, or the race is not fair.
	for _, argv := range [][]string{{bin, "chain", "--json", top}, {"qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", top}} {
		out, err := exec.Command(argv[0], argv[1:]...).Output()
		if err != nil {
			b.Fatalf("%v: %v", argv, err)
		}
		if n := strings.Count(string(out), `"format"`); n != benchChainDepth {
			b.Fatalf("%v: %d layers, want %d", argv, n, benchChainDepth)
		}
	}
	b.Run("native", func(b *testing.B) { benchProcess(b, bin, "chain", "--json", top) })
	b.Run("qemu-img", func(b *testing.B) {
		benchProcess(b, "qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", top)
	})
}

// benchProcess runs argv b.N times and reports the median run.
func benchProcess(b *testing.B, argv ...string) {
	var runs []time.Duration
	for b.Loop() {
		start := time.Now()
		if err := exec.Command(argv[0], argv[1:]...).Run(); err != nil {
			b.Fatalf("%v: %v", argv, err)
		}
		runs = append(runs, time.Since(start))
	}
	slices.Sort(runs)
	b.ReportMetric(float64(runs[len(runs)/2].Nanoseconds()), "ns/op")
}

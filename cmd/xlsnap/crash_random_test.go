package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xlsnap/xlsnap/driver"
)

// regions is how many 64 KiB regions, 1 MiB apart, the random campaign
// writes and reads.
const regions = 4

// TestCrashRandom runs a seeded random sequence of creates, reverts and
// deletes through the command and kills it with SIGKILL at a random
// moment of each (not at a named point: anywhere, qemu-img included).
// After every kill, before any xlsnap call, the definition must name an
// image that qemu-img check passes and that reads either the state
// before the operation or the one after it. The next call recovers;
// check must then find nothing, and every snapshot left must read
// exactly what it held. XLSNAP_CRASH_OPS sets the number of operations
// (make crash runs hundreds); the seed is XLSNAP_CRASH_SEED or the time.
func TestCrashRandom(t *testing.T) {
	ops := 24
	if v, err := strconv.Atoi(os.Getenv("XLSNAP_CRASH_OPS")); err == nil {
		ops = v
	}
	seed := uint64(time.Now().UnixNano())
	if v, err := strconv.ParseUint(os.Getenv("XLSNAP_CRASH_SEED"), 10, 64); err == nil {
		seed = v
	}
	t.Logf("seed %d (XLSNAP_CRASH_SEED=%d to replay), %d operations", seed, seed, ops)
	rng := rand.New(rand.NewPCG(seed, 0))
	c := newCLI(t)
	// XLSNAP_CRASH_KEEP=DIR keeps a failed campaign's folders for study.
	if keep := os.Getenv("XLSNAP_CRASH_KEEP"); keep != "" {
		t.Cleanup(func() {
			if t.Failed() {
				exec.Command("cp", "-a", c.dir, filepath.Join(keep, "domains")).Run()
				exec.Command("cp", "-a", c.state, filepath.Join(keep, "state")).Run()
			}
		})
	}
	type content = [regions]byte
	cur := content{}
	snaps := map[string]content{}
	var pattern byte = 0x10
	next := 0
	outcomes := map[string]int{}

	readAll := func(path string) content {
		var got content
		for r := range regions {
			got[r] = readByte(t, path, r<<20)
		}
		return got
	}
	names := func() []string {
		var out []string
		for n := range snaps {
			out = append(out, n)
		}
		slices.Sort(out)
		return out
	}
	for i := 0; i < ops; i++ {
		// A write between operations: a pattern into one region.
		pattern++
		if pattern == 0 || pattern == 0x11 || pattern == 0x22 {
			pattern = 0x30
		}
		r := rng.IntN(regions)
		qemuIOWrite(t, defSource(t, c, "xvda"), pattern, r<<20)
		cur[r] = pattern

		var args []string
		var post content
		kind := rng.IntN(4)
		if len(snaps) == 0 {
			kind = 0
		}
		name := ""
		switch kind {
		case 0:
			name = fmt.Sprintf("s%d", next)
			next++
			args, post = []string{"snapshot-create-as", "vm", name, "--disk-only", "--diskspec", "xvda,snapshot=external", "--diskspec", "xvdb,snapshot=no"}, cur
		case 1:
			name = names()[rng.IntN(len(snaps))]
			args, post = []string{"snapshot-revert", "vm", name}, snaps[name]
		case 2:
			name = names()[rng.IntN(len(snaps))]
			args, post = []string{"snapshot-delete", "vm", name}, cur
		case 3:
			name = names()[rng.IntN(len(snaps))]
			args, post = []string{"snapshot-delete", "vm", name, "--children"}, cur
		}
		// What a --children delete takes: the snapshot and its descendants.
		var family []string
		if kind == 3 {
			family = append(descendants(t, c, name), name)
		}
		delay := time.Duration(rng.IntN(60_000)) * time.Microsecond
		killed := killAfter(t, c, delay, args...)

		// Before any xlsnap call: what a hypervisor would start from.
		src := defSource(t, c, "xvda")
		// Leaked clusters (exit 3: "no harm to data") are what a killed
		// qemu-img leaves; QEMU opens the image, and recovery frees them.
		if out, err := exec.Command("qemu-img", "check", "-f", "qcow2", src).CombinedOutput(); err != nil && exitCode(err) != 3 {
			t.Fatalf("op %d %v killed=%v after %v: the definition names %s, which qemu-img check refuses: %v\n%s", i, args, killed, delay, src, err, out)
		}
		got := readAll(src)
		if got != cur && got != post {
			t.Fatalf("op %d %v killed after %v: the definition names %s reading %x; want %x (before) or %x (after)", i, args, delay, src, got, cur, post)
		}
		if out := c.ok("check"); out != "no problems found\n" {
			t.Fatalf("op %d %v killed after %v, then check: %s", i, args, delay, out)
		}
		if out, err := exec.Command("qemu-img", "check", "-f", "qcow2", defSource(t, c, "xvda")).CombinedOutput(); err != nil {
			t.Fatalf("op %d %v killed after %v: after recovery the definition's image fails qemu-img check: %v\n%s", i, args, delay, err, out)
		}
		// Which way did it go?
		list := strings.Fields(c.ok("snapshot-list", "vm", "--name"))
		slices.Sort(list)
		done := false
		switch kind {
		case 0:
			done = slices.Contains(list, name)
		case 1:
			done = readAll(defSource(t, c, "xvda")) == post
		case 2:
			done = !slices.Contains(list, name)
		case 3:
			// Each snapshot's delete is its own operation: a kill leaves
			// some of the family deleted, each whole.
			for _, n := range family {
				if !slices.Contains(list, n) {
					delete(snaps, n)
				}
			}
			done = !slices.Contains(list, name)
		}
		if done {
			switch kind {
			case 0:
				snaps[name] = cur
			case 1:
				cur = post
			case 2:
				delete(snaps, name)
			}
		}
		op := args[0]
		if kind == 3 {
			op += " --children"
		}
		outcomes[fmt.Sprintf("%s killed=%v done=%v", op, killed, done)]++
		if got := readAll(defSource(t, c, "xvda")); got != cur {
			t.Fatalf("op %d %v (killed=%v, done=%v): the disk reads %x, want %x", i, args, killed, done, got, cur)
		}
		if !slices.Equal(list, names()) {
			t.Fatalf("op %d %v (killed=%v, done=%v): snapshots %v, want %v", i, args, killed, done, list, names())
		}
		verifySnapshots(t, c, func(n string) ([regions]byte, bool) { s, ok := snaps[n]; return s, ok }, readAll)
	}
	var keys []string
	for k := range outcomes {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		t.Logf("%4d × %s", outcomes[k], k)
	}
}

// verifySnapshots reads every snapshot's state image of xvda (through
// the library, as recorded) and compares it with the model.
func verifySnapshots(t *testing.T, c *cli, want func(string) ([regions]byte, bool), readAll func(string) [regions]byte) {
	t.Helper()
	ctx := context.Background()
	d := c.library()
	defer d.Close()
	list, err := d.ListAllSnapshots(ctx, "vm", 0)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range list {
		w, ok := want(s.Name)
		if !ok {
			t.Fatalf("snapshot %s is not in the model", s.Name)
		}
		sd := s.Disk("xvda")
		if sd == nil || sd.Image == "" {
			t.Fatalf("snapshot %s has no xvda image: %+v", s.Name, s.Disks)
		}
		if got := readAll(sd.Image); got != w {
			t.Fatalf("snapshot %s (%s) reads %x, want %x", s.Name, sd.Image, got, w)
		}
	}
}

// killAfter runs the command and SIGKILLs it after delay (if it is still
// running); it reports whether the kill landed.
func killAfter(t *testing.T, c *cli, delay time.Duration, args ...string) bool {
	t.Helper()
	// A killed xlsnap's qemu-img dies too (Pdeathsig), but a moment later:
	// as the children's subreaper, the test waits for it before it looks
	// at the images.
	subreaper.Do(func() {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			t.Fatalf("PR_SET_CHILD_SUBREAPER: %v", err)
		}
	})
	defer reapOrphans()
	cmd := exec.Command(os.Args[0], append([]string{"--connect", "file://" + c.dir, "--state-dir", c.state}, args...)...)
	cmd.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1")
	var errb strings.Builder
	cmd.Stderr = &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	timer := time.AfterFunc(delay, func() { cmd.Process.Signal(syscall.SIGKILL) })
	err := cmd.Wait()
	timer.Stop()
	if ee, ok := err.(*exec.ExitError); ok {
		if ws := ee.Sys().(syscall.WaitStatus); ws.Signaled() {
			return true
		}
		t.Fatalf("xlsnap %v: %v: %s", args, err, errb.String())
	} else if err != nil {
		t.Fatal(err)
	}
	return false
}

func qemuIOWrite(t *testing.T, path string, pattern byte, off int) {
	t.Helper()
	qemuIO(t, path, fmt.Sprintf("write -P 0x%02x %d 64k", pattern, off))
}

var subreaper sync.Once

// reapOrphans waits for every child left (what a killed xlsnap started);
// TestCrashRandom runs alone (not parallel), so they are all its own.
func reapOrphans() {
	for {
		var ws syscall.WaitStatus
		if _, err := syscall.Wait4(-1, &ws, 0, nil); err != nil {
			return // ECHILD: none left
		}
	}
}

// descendants lists a snapshot's descendants, through the library.
func descendants(t *testing.T, c *cli, name string) []string {
	t.Helper()
	ctx := context.Background()
	d := c.library()
	defer d.Close()
	list, err := d.SnapshotListAllChildren(ctx, "vm", name, driver.ListDescendants)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, s := range list {
		out = append(out, s.Name)
	}
	return out
}

// library opens the driver on the command's folder and state, in the
// test's process, to read what the command recorded.
func (c *cli) library() *driver.Driver {
	c.t.Helper()
	src, err := driver.NewDirSource(c.dir)
	if err != nil {
		c.t.Fatal(err)
	}
	d, err := driver.Open(context.Background(), driver.Config{StateDir: c.state, Source: src})
	if err != nil {
		c.t.Fatal(err)
	}
	return d
}

// exitCode is a finished command's exit status, -1 if it did not exit.
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	return -1
}

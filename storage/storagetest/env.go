// Package storagetest is the conformance suite every storage backend
// runs, on real images: qemu-img makes them, qemu-io writes and reads
// back the data each snapshot must show, qemu-img check judges them.
package storagetest

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/storage"
)

// Env is one subtest's world: a pool folder, a state folder and a Manager.
type Env struct {
	T        *testing.T
	Ctx      context.Context
	Pool     string
	StateDir string
	Config   storage.Config
	M        *storage.Manager
}

// NewEnv opens a Manager on a fresh pool of the given backend type.
func NewEnv(t *testing.T, typ string) *Env {
	t.Helper()
	pool, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	e := &Env{T: t, Ctx: context.Background(), Pool: pool, StateDir: t.TempDir()}
	e.Config = storage.Config{StateDir: e.StateDir, Pools: []storage.PoolConfig{{Name: "default", Type: typ, Path: pool}}}
	e.Reopen()
	t.Cleanup(func() { e.M.Close() })
	return e
}

// Reopen opens the Manager again, as a new process would (recovery runs).
func (e *Env) Reopen() {
	e.T.Helper()
	if e.M != nil {
		e.M.Close()
	}
	m, err := storage.Open(e.Ctx, e.Config)
	if err != nil {
		e.T.Fatalf("storage.Open: %v", err)
	}
	e.M = m
}

// Path is a file name inside the pool.
func (e *Env) Path(name string) string { return filepath.Join(e.Pool, name) }

// Run runs a command and fails the test with its output on error.
func (e *Env) Run(name string, args ...string) string {
	e.T.Helper()
	return Run(e.T, name, args...)
}

// Run runs a command and fails tb with its output on error.
func Run(tb testing.TB, name string, args ...string) string {
	tb.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		tb.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// CopyFile copies src to dst (made or truncated), for benchmarks that
// start each round from a template image.
func CopyFile(tb testing.TB, src, dst string) {
	tb.Helper()
	in, err := os.Open(src)
	if err != nil {
		tb.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		tb.Fatal(err)
	}
	if err := out.Close(); err != nil {
		tb.Fatal(err)
	}
}

// NewDomain makes one qcow2 image of 16 MiB per disk and defines the
// domain with them.
func (e *Env) NewDomain(name string, disks ...string) *storage.Domain {
	e.T.Helper()
	var specs []storage.DiskSpec
	for _, disk := range disks {
		p := e.Path(name + "-" + disk + ".qcow2")
		e.Run("qemu-img", "create", "-q", "-f", "qcow2", p, "16M")
		specs = append(specs, storage.DiskSpec{Target: disk, Path: p, Format: "qcow2"})
	}
	d, err := e.M.DefineDomain(e.Ctx, name, name, "", specs)
	if err != nil {
		e.T.Fatalf("DefineDomain: %v", err)
	}
	return d
}

// Active is the disk's active layer now, from metadata.
func (e *Env) Active(domain, disk string) (path, format string) {
	e.T.Helper()
	d, err := e.M.Domain(e.Ctx, domain)
	if err != nil {
		e.T.Fatal(err)
	}
	dk := d.Disk(disk)
	if dk == nil {
		e.T.Fatalf("domain %s has no disk %s", domain, disk)
	}
	return dk.Active, dk.Format
}

// Write writes pattern over [off, off+len) of the disk's active layer.
func (e *Env) Write(domain, disk string, pattern byte, off, length int) {
	e.T.Helper()
	p, f := e.Active(domain, disk)
	e.Run("qemu-io", "-f", f, "-c", fmt.Sprintf("write -P 0x%02x %d %d", pattern, off, length), p)
}

// Expect asserts that the disk reads pattern over [off, off+len).
func (e *Env) Expect(domain, disk string, pattern byte, off, length int) {
	e.T.Helper()
	p, f := e.Active(domain, disk)
	ExpectImage(e.T, p, f, pattern, off, length)
}

// ExpectImage asserts an image reads pattern over [off, off+len).
func ExpectImage(t *testing.T, path, format string, pattern byte, off, length int) {
	t.Helper()
	// -U: the image may be open in a running device model.
	out, err := exec.Command("qemu-io", "-r", "-U", "-f", format, "-c",
		fmt.Sprintf("read -P 0x%02x %d %d", pattern, off, length), path).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") || strings.Contains(string(out), "error") {
		t.Fatalf("%s at %d+%d: want pattern 0x%02x: %v\n%s", path, off, length, pattern, err, out)
	}
}

// CheckClean runs qemu-img check on every image of the domain's tree and
// asserts every recorded image exists, and that Check finds nothing.
func (e *Env) CheckClean(domain string) {
	e.T.Helper()
	e.checkImages(domain, false)
}

// CheckNoFault is CheckClean with informational findings allowed (a
// chain that could be shorter, a shared base): for tests whose layers
// no snapshot needs on purpose.
func (e *Env) CheckNoFault(domain string) {
	e.T.Helper()
	e.checkImages(domain, true)
}

func (e *Env) checkImages(domain string, informational bool) {
	e.T.Helper()
	d, err := e.M.Domain(e.Ctx, domain)
	if err != nil {
		e.T.Fatal(err)
	}
	for p, img := range d.Images {
		if _, err := os.Stat(p); err != nil {
			e.T.Fatalf("recorded image %s: %v", p, err)
		}
		if img.Format == "qcow2" {
			e.Run("qemu-img", "check", "-q", "-f", "qcow2", p)
		}
	}
	problems, err := e.M.Check(e.Ctx)
	if err != nil {
		e.T.Fatal(err)
	}
	for _, p := range problems {
		if !informational || !p.Kind.Informational() {
			e.T.Fatalf("Check found %+v", problems)
		}
	}
}

// Chain is the disk's recorded chain, top to base, as file names.
func (e *Env) Chain(domain, disk string) []string {
	e.T.Helper()
	d, err := e.M.Domain(e.Ctx, domain)
	if err != nil {
		e.T.Fatal(err)
	}
	var out []string
	for _, p := range d.Chain(d.Disk(disk).Active) {
		out = append(out, filepath.Base(p))
	}
	if len(out) > len(d.Images) {
		e.T.Fatalf("loop in the recorded chain %v", out)
	}
	return out
}

// ExpectChain asserts the disk's recorded chain.
func (e *Env) ExpectChain(domain, disk string, want ...string) {
	e.T.Helper()
	if got := e.Chain(domain, disk); strings.Join(got, " ") != strings.Join(want, " ") {
		e.T.Fatalf("chain of %s/%s: got %v, want %v", domain, disk, got, want)
	}
}

// PoolFiles lists the files in the pool.
func (e *Env) PoolFiles() []string {
	e.T.Helper()
	return Files(e.T, e.Pool)
}

// Files names what dir holds, in order, so a test can say that a
// refused or failed call left a folder as it was.
func Files(tb testing.TB, dir string) []string {
	tb.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		tb.Fatal(err)
	}
	var out []string
	for _, en := range entries {
		out = append(out, en.Name())
	}
	return out
}

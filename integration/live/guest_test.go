package live

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	lv "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/driver/libvirtsource"
	"github.com/xlsnap/xlsnap/internal/crashpoint"
	"github.com/xlsnap/xlsnap/storage/storagetest"
	xlvirt "github.com/xlsnap/xlsnap/xenlight/libvirt"
)

var guestSeq atomic.Int64

// guestEnv is a running domain of libvirt's test driver (whose save stops
// the domain, as libvirt's libxl driver's does) with one qcow2 disk that
// reads 0x61.
type guestEnv struct {
	t     *testing.T
	ctx   context.Context
	pool  string
	state string
	name  string
	src   *libvirtsource.Source
	dom   *lv.Domain
	d     *driver.Driver
}

func newGuestEnv(t *testing.T) *guestEnv {
	t.Helper()
	e := &guestEnv{t: t, ctx: context.Background(), pool: t.TempDir(), state: t.TempDir(),
		name: fmt.Sprintf("guest%d_%d", os.Getpid(), guestSeq.Add(1))}
	img := filepath.Join(e.pool, "vda.qcow2")
	sh(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 1M", img)
	var err error
	if e.src, err = libvirtsource.Open("test:///default"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.src.Close() })
	def := fmt.Sprintf(`<domain type='test'><name>%s</name><memory>131072</memory><os><type>hvm</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='vda'/></disk>
</devices></domain>`, e.name, img)
	if e.dom, err = e.src.Conn().DomainDefineXML(def); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.dom.Destroy(); e.dom.Undefine(); e.dom.Free() })
	if err := e.dom.Create(); err != nil {
		t.Fatal(err)
	}
	e.open()
	return e
}

// open opens a driver on the state folder, as the next process would.
func (e *guestEnv) open() {
	e.t.Helper()
	if e.d != nil {
		e.d.Close()
	}
	d, err := driver.Open(e.ctx, driver.Config{StateDir: e.state, Source: e.src, Pools: []string{e.pool}, Hypervisor: xlvirt.New(e.src.Conn())})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { d.Close() })
	e.d = d
}

func (e *guestEnv) domState() lv.DomainState {
	e.t.Helper()
	st, _, err := e.dom.GetState()
	if err != nil {
		e.t.Fatal(err)
	}
	return st
}

// liveDisk is the file the domain (as libvirt runs or defines it) writes.
func (e *guestEnv) liveDisk() string {
	e.t.Helper()
	doc, err := e.dom.GetXMLDesc(0)
	if err != nil {
		e.t.Fatal(err)
	}
	var x libvirtxml.Domain
	if err := x.Unmarshal(doc); err != nil {
		e.t.Fatal(err)
	}
	return x.Devices.Disks[0].Source.File.File
}

// crashAt runs op until the crash point (see crashpoint.Catch), which it
// must reach.
func crashAt(t *testing.T, point string, op func() error) {
	t.Helper()
	crashed, err := crashpoint.Catch(point, op)
	if err != nil {
		t.Fatalf("before %s: %v", point, err)
	}
	if !crashed {
		t.Fatalf("the operation never reached %s", point)
	}
}

// TestGuestStepsRecover crashes a memory snapshot and a revert of a
// running domain at each of their hypervisor and disk steps (in-process:
// the test driver's domains live in the process), then opens a new
// driver, as the next command would: the first call puts the domain back
// (resumed, or restored from the memory image onto the current disks), a
// memory image no snapshot holds is gone, and check finds nothing.
func TestGuestStepsRecover(t *testing.T) {
	snapXML := func(e *guestEnv, name string) string {
		return fmt.Sprintf(`<domainsnapshot><name>%s</name><memory snapshot='external' file='%s'/><disks><disk name='vda' snapshot='external'/></disks></domainsnapshot>`,
			name, filepath.Join(e.pool, "mem."+name))
	}
	for _, point := range []string{"guest-snapshot/begun", "guest-snapshot/paused", "guest-snapshot/stopped",
		"snapshot/intent-written", "snapshot/steps-done", "snapshot/committed", "snapshot/definition", "guest-snapshot/disks-done"} {
		t.Run("snapshot/"+strings.ReplaceAll(point, "/", "-"), func(t *testing.T) {
			e := newGuestEnv(t)
			crashAt(t, point, func() error {
				_, err := e.d.SnapshotCreateXML(e.ctx, e.name, snapXML(e, "s1"), 0)
				return err
			})
			e.open()
			if _, err := e.d.DiskList(e.ctx, e.name); err != nil {
				t.Fatalf("the first call after the crash: %v", err)
			}
			if st := e.domState(); st != lv.DOMAIN_RUNNING {
				t.Fatalf("after recovery the domain is %v, want running", st)
			}
			storagetest.ExpectImage(t, e.liveDisk(), "qcow2", 0x61, 0, 1<<20)
			list, err := e.d.ListAllSnapshots(e.ctx, e.name, 0)
			if err != nil {
				t.Fatal(err)
			}
			mem := filepath.Join(e.pool, "mem.s1")
			_, memErr := os.Stat(mem)
			if held := len(list) == 1; held != (memErr == nil) {
				t.Fatalf("snapshot kept %v, memory image there %v: want both or neither", held, memErr == nil)
			}
			if problems, err := e.d.Storage().Check(e.ctx); err != nil || len(problems) != 0 {
				t.Fatalf("check: %+v %v", problems, err)
			}
		})
	}
	for _, point := range []string{"guest-revert/begun", "guest-revert/destroyed", "revert/intent-written",
		"revert/committed", "revert/definition", "guest-revert/disks-done"} {
		t.Run("revert/"+strings.ReplaceAll(point, "/", "-"), func(t *testing.T) {
			e := newGuestEnv(t)
			if _, err := e.d.SnapshotCreateXML(e.ctx, e.name, snapXML(e, "s1"), 0); err != nil {
				t.Fatal(err)
			}
			sh(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x62 0 1M", e.liveDisk())
			crashAt(t, point, func() error { return e.d.RevertToSnapshot(e.ctx, e.name, "s1", 0) })
			e.open()
			_, err := e.d.DiskList(e.ctx, e.name)
			rec, _ := e.d.SnapshotCurrent(e.ctx, e.name, 0)
			reverted := rec != nil && rec.Name == "s1" && e.liveDisk() != filepath.Join(e.pool, "vda.s1")
			switch {
			case point == "guest-revert/begun":
				// Nothing was stopped: the domain runs on, unreverted.
				if err != nil || e.domState() != lv.DOMAIN_RUNNING {
					t.Fatalf("after recovery: %v, state %v", err, e.domState())
				}
				storagetest.ExpectImage(t, e.liveDisk(), "qcow2", 0x62, 0, 1<<20)
			case reverted:
				// The revert is done: the domain comes back from s1's memory
				// onto the reverted disk.
				if err != nil || e.domState() != lv.DOMAIN_RUNNING {
					t.Fatalf("after recovery: %v, state %v", err, e.domState())
				}
				storagetest.ExpectImage(t, e.liveDisk(), "qcow2", 0x61, 0, 1<<20)
			default:
				// The revert was undone after the domain was stopped: it is
				// reported once and stays stopped, its disk as it was.
				if !errors.Is(err, driver.ErrGuestStopped) || e.domState() != lv.DOMAIN_SHUTOFF {
					t.Fatalf("after recovery: %v, state %v; want ErrGuestStopped and shut off", err, e.domState())
				}
				storagetest.ExpectImage(t, e.liveDisk(), "qcow2", 0x62, 0, 1<<20)
				if _, err := e.d.DiskList(e.ctx, e.name); err != nil {
					t.Fatalf("the report is given once: %v", err)
				}
			}
			if problems, err := e.d.Storage().Check(e.ctx); err != nil || len(problems) != 0 {
				t.Fatalf("check: %+v %v", problems, err)
			}
			if pending, _ := e.d.Storage().GuestPending(e.ctx, ""); len(pending) != 0 {
				t.Fatalf("guest records left: %+v", pending)
			}
		})
	}
}

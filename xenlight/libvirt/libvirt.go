// Package libvirt is the xenlight back end for active domains reached
// through a libvirt connection, any URI (xen:///system, qemu:///session,
// test:///default), by libvirt.org/go/libvirt. libvirt keeps the domain's
// lifecycle; this package only pauses, resumes, saves, restores and
// destroys. Live block operations need the device model's QMP: libvirt's
// libxl driver leaves it to libxl's socket, which DeviceModel uses; the
// QEMU driver keeps its own to itself, so a QEMU domain needs a second
// monitor in its definition (QMPSocketOf).
//
// A restart of the daemon does not stop its domains (libvirt reconnects
// to their running QEMU or libxl at its start), and does not wedge this
// package: the call that finds its connection lost fails with
// ErrNoConnection, and the next one connects again (Conn). libvirt's
// calls block in C and cannot be cancelled: a context is checked before
// each call, and a daemon that stops answering is given up on by
// keepalive (Keepalive; the package runs libvirt's default event loop,
// which keepalive needs).
package libvirt

import (
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"sync"

	lv "libvirt.org/go/libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/virterr"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// Hypervisor drives active domains through one libvirt connection. A
// libvirt connection is safe for concurrent use, and so is this. A
// connection lost to a restart of the daemon fails the call that finds
// it with ErrNoConnection; the next call connects again (see Conn).
type Hypervisor struct {
	c     *Conn
	owned bool // Close closes c

	xenMu    sync.Mutex
	xenKnown bool
	xen      bool
}

var _ xenlight.Hypervisor = (*Hypervisor)(nil)

// New uses an open connection; Close leaves it open for its owner. A
// connection a Conn made (Dial, libvirtsource.Open) is used through that
// Conn: once it is lost, the owner's next connection serves both, and the
// owner closes it. Any other is borrowed: once it is lost, the Hypervisor
// connects again to its URI by itself, with DefaultKeepalive, and Close
// closes that connection.
func New(conn *lv.Connect) *Hypervisor {
	if c, ok := connOf(conn); ok {
		return &Hypervisor{c: c}
	}
	return &Hypervisor{c: borrow(conn), owned: true}
}

// Open connects to uri (Dial, with DefaultKeepalive); Close closes that
// connection.
func Open(uri string) (*Hypervisor, error) {
	c, err := Dial(uri, DefaultKeepalive)
	if err != nil {
		return nil, err
	}
	return &Hypervisor{c: c, owned: true}, nil
}

// Conn is the connection as it stands (perhaps lost), for callers that
// need more of libvirt.
func (h *Hypervisor) Conn() *lv.Connect { return h.c.Current() }

// Close closes the connections the Hypervisor opened.
//
// Errors: libvirt's, closing.
func (h *Hypervisor) Close() error {
	if !h.owned {
		return nil
	}
	return h.c.Close()
}

func wrap(op string, err error) error { return virterr.Wrap(op, err, nil) }

// with looks the domain up and runs fn on it and its connection.
// libvirt's calls block in C and cannot be cancelled: ctx is checked
// before the call only, and keepalive bounds a call on a daemon that
// stopped answering (see Keepalive).
func (h *Hypervisor) with(ctx context.Context, op, domain string, fn func(*lv.Connect, *lv.Domain) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s %s: %w", op, domain, err)
	}
	conn, err := h.c.Get(ctx)
	if err != nil {
		return fmt.Errorf("%s %s: %w", op, domain, err)
	}
	dom, err := conn.LookupDomainByName(domain)
	if err != nil {
		return h.c.Wrap(conn, op+" "+domain, err, nil)
	}
	defer dom.Free()
	if err := fn(conn, dom); err != nil {
		return h.c.Wrap(conn, op+" "+domain, err, nil)
	}
	return nil
}

// on is with for fn that needs only the domain.
func on(fn func(*lv.Domain) error) func(*lv.Connect, *lv.Domain) error {
	return func(_ *lv.Connect, dom *lv.Domain) error { return fn(dom) }
}

// State reports the domain's state; one libvirt does not know is Shutoff.
// A domain that is shutting down or crashed (and preserved) is still
// active, its disks open: it is reported Running or Paused, never
// Shutoff, so nobody works on its images offline.
func (h *Hypervisor) State(ctx context.Context, domain string) (xenlight.State, error) {
	var st lv.DomainState
	err := h.with(ctx, "reading the state of", domain, func(_ *lv.Connect, dom *lv.Domain) error {
		var err error
		if st, _, err = dom.GetState(); err != nil {
			return err
		}
		if st == lv.DOMAIN_NOSTATE {
			active, err := dom.IsActive()
			if err != nil {
				return err
			}
			st = lv.DOMAIN_SHUTOFF
			if active {
				st = lv.DOMAIN_RUNNING
			}
		}
		return nil
	})
	if errors.Is(err, errdefs.ErrNoDomain) {
		return xenlight.Shutoff, nil
	}
	if err != nil {
		return "", err
	}
	return StateOf(st), nil
}

// StateOf names a libvirt domain state: a domain shutting down or crashed
// (and preserved) still has its disks open, so it is active, never
// Shutoff. The domain source reads states through it too.
func StateOf(st lv.DomainState) xenlight.State {
	switch st {
	case lv.DOMAIN_RUNNING, lv.DOMAIN_BLOCKED, lv.DOMAIN_SHUTDOWN:
		return xenlight.Running
	case lv.DOMAIN_PAUSED, lv.DOMAIN_PMSUSPENDED, lv.DOMAIN_CRASHED:
		return xenlight.Paused
	}
	return xenlight.Shutoff
}

// PausesVCPUs: on libvirt's libxl driver Xen, not the device model,
// runs a guest's vCPUs (xenlight.VCPUPauser). A daemon that cannot be
// asked is an error: not knowing, a pivot would not hold a Xen guest.
func (h *Hypervisor) PausesVCPUs(ctx context.Context) (bool, error) {
	conn, err := h.c.Get(ctx)
	if err != nil {
		return false, err
	}
	return h.isXen(conn)
}

// Pause suspends the domain's vCPUs (virDomainSuspend).
func (h *Hypervisor) Pause(ctx context.Context, domain string) error {
	return h.with(ctx, "pausing", domain, on((*lv.Domain).Suspend))
}

// Resume lets a paused domain run again (virDomainResume).
func (h *Hypervisor) Resume(ctx context.Context, domain string) error {
	return h.with(ctx, "resuming", domain, on((*lv.Domain).Resume))
}

// SaveMemory saves the domain's memory and stops it (virDomainSaveFlags).
// A checkpoint, where the domain goes on, is ErrLiveUnsupported: libvirt's
// save always stops the domain. libvirt's libxl driver saves only a
// running domain (libxl's suspend needs the guest to acknowledge it), so
// a paused one is resumed for the save and stands at the point the
// suspend stopped it, as xl save does; a failed save pauses it again.
func (h *Hypervisor) SaveMemory(ctx context.Context, domain, path string, checkpoint bool) error {
	if checkpoint {
		return fmt.Errorf("%w: saving the memory of %s through libvirt stops it; a checkpoint save needs the libxl back end", xenlight.ErrLiveUnsupported, domain)
	}
	// The daemon writes the file from its own working directory.
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("saving the memory of %s: %w", domain, err)
	}
	return h.with(ctx, "saving the memory of", domain, func(conn *lv.Connect, dom *lv.Domain) error {
		st, _, err := dom.GetState()
		if err != nil {
			return err
		}
		xen, err := h.isXen(conn)
		if err != nil {
			return err
		}
		resumed := st == lv.DOMAIN_PAUSED && xen
		if resumed {
			if err := dom.Resume(); err != nil {
				return err
			}
		}
		err = dom.SaveFlags(abs, "", 0)
		if err != nil && resumed {
			if perr := dom.Suspend(); perr != nil {
				return errors.Join(err, perr)
			}
		}
		return err
	})
}

// Restore starts the domain from a memory image with definition, the
// domain XML whose disks point at the layers it is to write. libvirt
// takes the definition with the image (virDomainRestoreFlags' dxml); a
// driver that cannot (the test driver) gets it written into the image
// first (virDomainSaveImageDefineXML). A driver that can do neither is
// an error: a restore onto the old disks would lose every write since
// the snapshot.
func (h *Hypervisor) Restore(ctx context.Context, domain, path, definition string, paused bool) error {
	op := "restoring " + domain
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	if err := checkName(domain, definition); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	flags := lv.DOMAIN_SAVE_RUNNING
	if paused {
		flags = lv.DOMAIN_SAVE_PAUSED
	}
	conn, err := h.c.Get(ctx)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	err = conn.DomainRestoreFlags(abs, definition, flags)
	if err == nil || !refusedDefinition(err) {
		if err != nil {
			return h.c.Wrap(conn, op, err, nil)
		}
		return nil
	}
	if err := h.defineImage(conn, abs, definition); err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	err = conn.DomainRestoreFlags(abs, "", flags)
	if err != nil && unsupportedFlags(err) {
		// The image's definition is now the new one; only the state
		// to start in is left, and a driver without restore flags
		// starts the domain running.
		if err = conn.DomainRestore(abs); err == nil && paused {
			return h.Pause(ctx, domain)
		}
	}
	if err != nil {
		return h.c.Wrap(conn, op, err, nil)
	}
	return nil
}

// defineImage puts definition into the save image: through libvirt
// (virDomainSaveImageDefineXML) where the driver can, and for libvirt's
// libxl driver, which cannot, by rewriting the image's header.
func (h *Hypervisor) defineImage(conn *lv.Connect, path, definition string) error {
	err := conn.DomainSaveImageDefineXML(path, definition, 0)
	if err == nil {
		return nil
	}
	xen := false
	if virterr.Code(err) == lv.ERR_NO_SUPPORT {
		var xerr error
		if xen, xerr = h.isXen(conn); xerr != nil {
			return h.c.Wrap(conn, "reading the driver's type", xerr, nil)
		}
	}
	if !xen {
		return h.c.Wrap(conn, "the driver takes no definition with the image, nor into it", err, nil)
	}
	if err := redefineLibxlImage(path, definition); err != nil {
		if errors.Is(err, errNotLibxlImage) {
			err = fmt.Errorf("%w: %v", errdefs.ErrInvalidArg, err)
		}
		return fmt.Errorf("rewriting the definition in the save image: %w", err)
	}
	return nil
}

// isXen: the connection is libvirt's libxl driver (xen:///system). A
// URI's driver never changes: libvirt is asked until it answers once
// (a daemon that is down answers nothing, which says nothing of its
// driver).
func (h *Hypervisor) isXen(conn *lv.Connect) (bool, error) {
	h.xenMu.Lock()
	defer h.xenMu.Unlock()
	if !h.xenKnown {
		typ, err := conn.GetType()
		if err != nil {
			return false, err
		}
		h.xen, h.xenKnown = typ == "Xen", true
	}
	return h.xen, nil
}

// refusedDefinition: the driver took neither the definition with the
// image nor the flags (the test driver checks its flags first).
func refusedDefinition(err error) bool {
	return virterr.Code(err) == lv.ERR_ARGUMENT_UNSUPPORTED || unsupportedFlags(err)
}

func unsupportedFlags(err error) bool {
	var le lv.Error
	return errors.As(err, &le) && le.Code == lv.ERR_INVALID_ARG && strings.Contains(le.Message, "unsupported flags")
}

// checkName refuses an empty definition (libvirt would quietly take the
// image's own, with the old disks) and one for another domain.
func checkName(domain, definition string) error {
	if strings.TrimSpace(definition) == "" {
		return fmt.Errorf("%w: a restore needs the domain definition with the disks it is to use", errdefs.ErrInvalidArg)
	}
	var d struct {
		Name string `xml:"name"`
	}
	if err := xml.Unmarshal([]byte(definition), &d); err != nil {
		return fmt.Errorf("%w: domain definition: %v", errdefs.ErrInvalidArg, err)
	}
	if d.Name != domain {
		return fmt.Errorf("%w: the definition is of domain %q", errdefs.ErrInvalidArg, d.Name)
	}
	return nil
}

// Destroy stops the domain at once (virDomainDestroy).
func (h *Hypervisor) Destroy(ctx context.Context, domain string) error {
	return h.with(ctx, "destroying", domain, on((*lv.Domain).Destroy))
}

// DeviceModel connects to the domain's device model where libvirt leaves
// a monitor free: under libvirt's libxl driver (xen:///system) libxl
// owns it, at xenlight.LibxlQMPSocket, one command at a time, as
// xlsnap uses it. The QEMU driver keeps its monitor to itself
// (qemu-monitor-command passes one command at a time, without events or
// block jobs), so a QEMU domain is reached only through a second QMP
// monitor its definition gives QEMU (see QMPSocketOf).
//
// Errors: ErrLiveUnsupported for a QEMU domain without a second monitor
// (or another driver); libvirt's for a domain it does not know; the
// socket's for a monitor that does not answer.
func (h *Hypervisor) DeviceModel(ctx context.Context, domain string) (*qmp.Monitor, error) {
	var id uint
	var desc string
	var xen bool
	err := h.with(ctx, "connecting to the device model of", domain, func(conn *lv.Connect, dom *lv.Domain) error {
		var err error
		if xen, err = h.isXen(conn); err != nil {
			return err
		}
		if xen {
			id, err = dom.GetID()
		} else {
			desc, err = dom.GetXMLDesc(0)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	if xen {
		return qmp.Dial(ctx, "unix", xenlight.LibxlQMPSocket(uint32(id)))
	}
	sock, err := QMPSocketOf(desc)
	if err != nil {
		return nil, err
	}
	if sock == "" {
		return nil, fmt.Errorf("%w: no direct QMP socket to the device model of %s through libvirt (give QEMU one with <qemu:commandline> -qmp unix:PATH,server=on,wait=off)", xenlight.ErrLiveUnsupported, domain)
	}
	return qmp.Dial(ctx, "unix", sock)
}

// QMPSocketOf returns the Unix socket of a QMP monitor that a QEMU
// domain's definition (its live XML) adds beside libvirt's own, with
// libvirt's command-line passthrough
// (https://libvirt.org/drvqemu.html#pass-through-of-arbitrary-qemu-commands):
//
//	<qemu:commandline>
//	  <qemu:arg value='-qmp'/>
//	  <qemu:arg value='unix:/run/xlsnap/web.qmp,server=on,wait=off'/>
//	</qemu:commandline>
//
// or "" when it adds none. QEMU serves several monitors at once and sends
// every event to each, so block jobs run there as on a device model of
// xlsnap's own; libvirt marks such a domain tainted (custom-argv), and
// its live XML keeps naming the disks it started with, while xlsnap
// rewrites the persistent definition.
//
// Errors: the XML's, for a definition that does not parse.
func QMPSocketOf(desc string) (string, error) {
	var d libvirtxml.Domain
	if err := d.Unmarshal(desc); err != nil {
		return "", fmt.Errorf("reading the domain's definition: %w", err)
	}
	if d.QEMUCommandline == nil {
		return "", nil
	}
	args := d.QEMUCommandline.Args
	for i := 0; i+1 < len(args); i++ {
		if args[i].Value != "-qmp" {
			continue
		}
		path, ok := strings.CutPrefix(args[i+1].Value, "unix:")
		if !ok {
			continue
		}
		path, _, _ = strings.Cut(path, ",")
		return path, nil
	}
	return "", nil
}

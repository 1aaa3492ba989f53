//go:build libxl

package libxl

/*
#cgo pkg-config: xenlight xentoollog
#define LIBXL_API_VERSION 0x041400
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <libxl.h>
#include <libxl_utils.h>
#include <xentoollog.h>

// xls_logger keeps libxl's last error messages, numbered, so a failed
// call can report what libxl logged meanwhile (its return codes say
// little). libxl logs from any thread: a mutex guards the ring.
#define XLS_NMSG 16
#define XLS_MSGLEN 512

typedef struct {
	xentoollog_logger vtable; // first: libxl sees only this
	pthread_mutex_t mu;
	unsigned long seq; // messages logged so far
	int errnoval[XLS_NMSG];
	char msg[XLS_NMSG][XLS_MSGLEN];
} xls_logger;

static void xls_vmessage(xentoollog_logger *lg, xentoollog_level level,
			 int errnoval, const char *context,
			 const char *format, va_list al)
{
	xls_logger *l = (xls_logger *)lg;
	char *m;
	int n = 0;

	if (level < XTL_ERROR)
		return;
	pthread_mutex_lock(&l->mu);
	m = l->msg[l->seq % XLS_NMSG];
	m[0] = '\0';
	if (context)
		n = snprintf(m, XLS_MSGLEN, "%s: ", context);
	if (n < 0 || n >= XLS_MSGLEN)
		n = 0;
	vsnprintf(m + n, XLS_MSGLEN - n, format, al);
	l->errnoval[l->seq % XLS_NMSG] = errnoval;
	l->seq++;
	pthread_mutex_unlock(&l->mu);
}

static void xls_logger_free(xls_logger *l)
{
	if (!l)
		return;
	pthread_mutex_destroy(&l->mu);
	free(l);
}

static void xls_destroy(xentoollog_logger *lg)
{
	xls_logger_free((xls_logger *)lg);
}

static xls_logger *xls_logger_new(void)
{
	xls_logger *l = calloc(1, sizeof(*l));

	if (!l)
		return NULL;
	if (pthread_mutex_init(&l->mu, NULL)) {
		free(l);
		return NULL;
	}
	l->vtable.vmessage = xls_vmessage;
	l->vtable.progress = NULL; // allowed: no progress reports
	l->vtable.destroy = xls_destroy;
	return l;
}

static unsigned long xls_seq(xls_logger *l)
{
	unsigned long s;

	pthread_mutex_lock(&l->mu);
	s = l->seq;
	pthread_mutex_unlock(&l->mu);
	return s;
}

// xls_message copies message seq out, if the ring still has it.
static int xls_message(xls_logger *l, unsigned long seq, char *buf,
		       size_t len, int *errnoval)
{
	int ok = 0;

	pthread_mutex_lock(&l->mu);
	if (seq < l->seq && l->seq - seq <= XLS_NMSG) {
		snprintf(buf, len, "%s", l->msg[seq % XLS_NMSG]);
		*errnoval = l->errnoval[seq % XLS_NMSG];
		ok = 1;
	}
	pthread_mutex_unlock(&l->mu);
	return ok;
}

// The Go program owns SIGCHLD (its runtime's handler, which libxl's own
// would replace without SA_ONSTACK) and tells libxl of every one; libxl
// then reaps only its own children, never those of os/exec. Must outlast
// the context: static.
static const libxl_childproc_hooks xls_childproc_hooks = {
	.chldowner = libxl_sigchld_owner_mainloop,
};

static int xls_ctx_alloc(xls_logger *l, libxl_ctx **ctx)
{
	int rc = libxl_ctx_alloc(ctx, LIBXL_VERSION, 0, &l->vtable);

	if (rc) {
		*ctx = NULL;
		return rc;
	}
	libxl_childproc_setmode(*ctx, &xls_childproc_hooks, NULL);
	return 0;
}

// XLS_SUSPENDED is a domain stopped by a suspend it can go on from
// (libxl_domain_resume with suspend_cancel=1), as a checkpoint leaves it.
enum { XLS_RUNNING, XLS_PAUSED, XLS_SHUTDOWN, XLS_DYING, XLS_SUSPENDED };

static int xls_state(libxl_ctx *ctx, uint32_t domid, int *state)
{
	libxl_dominfo info;
	int rc;

	libxl_dominfo_init(&info);
	rc = libxl_domain_info(ctx, &info, domid);
	if (!rc) {
		if (info.dying)
			*state = XLS_DYING;
		else if (info.shutdown &&
			 info.shutdown_reason == LIBXL_SHUTDOWN_REASON_SUSPEND)
			*state = XLS_SUSPENDED;
		else if (info.shutdown)
			*state = XLS_SHUTDOWN;
		else if (info.paused)
			*state = XLS_PAUSED;
		else
			*state = XLS_RUNNING;
	}
	libxl_dominfo_dispose(&info);
	return rc;
}

// xls_can_log_dirty says whether Xen can track the pages a domain
// dirties while it runs (log-dirty), which a live save needs: shadow
// paging for a PV domain, HAP or shadow paging for HVM and PVH ones
// (libxl_physinfo's cap_shadow and cap_hap: a Xen built without
// CONFIG_SHADOW_PAGING cannot save a PV domain live at all).
static int xls_can_log_dirty(libxl_ctx *ctx, uint32_t domid, int *ok, int *pv)
{
	libxl_physinfo pi;
	libxl_dominfo info;
	int rc;

	*ok = 0;
	*pv = 0;
	libxl_physinfo_init(&pi);
	libxl_dominfo_init(&info);
	rc = libxl_get_physinfo(ctx, &pi);
	if (!rc)
		rc = libxl_domain_info(ctx, &info, domid);
	if (!rc) {
		*pv = info.domain_type == LIBXL_DOMAIN_TYPE_PV;
		*ok = *pv ? pi.cap_shadow : (pi.cap_hap || pi.cap_shadow);
	}
	libxl_dominfo_dispose(&info);
	libxl_physinfo_dispose(&pi);
	return rc;
}

// xls_config_json is the domain's configuration as libxl's JSON; the
// caller frees *json.
static int xls_config_json(libxl_ctx *ctx, uint32_t domid, char **json)
{
	libxl_domain_config cfg;
	int rc;

	*json = NULL;
	libxl_domain_config_init(&cfg);
	rc = libxl_retrieve_domain_configuration(ctx, domid, &cfg, NULL);
	if (!rc) {
		*json = libxl_domain_config_to_json(ctx, &cfg);
		if (!*json)
			rc = ERROR_NOMEM;
	}
	libxl_domain_config_dispose(&cfg);
	return rc;
}

// xls_restore creates a domain from the configuration and the stream at
// fd, paused (xl restore's way: the caller unpauses). *parsed tells a
// configuration libxl refused from a failed restore. A half-made domain
// is destroyed, as xl does.
static int xls_restore(libxl_ctx *ctx, const char *json, int fd,
		       int stream_version, int *parsed, uint32_t *domid)
{
	libxl_domain_config cfg;
	libxl_domain_restore_params params;
	int rc;

	*parsed = 0;
	*domid = INVALID_DOMID;
	libxl_domain_config_init(&cfg);
	libxl_domain_restore_params_init(&params);
	rc = libxl_domain_config_from_json(ctx, &cfg, json);
	if (rc)
		goto out;
	*parsed = 1;
	params.stream_version = stream_version;
	rc = libxl_domain_create_restore(ctx, &cfg, domid, fd, -1, &params,
					 NULL, NULL);
	if (rc && libxl_domid_valid_guest(*domid)) {
		libxl_domain_destroy(ctx, *domid, NULL);
		*domid = INVALID_DOMID;
	}
out:
	libxl_domain_restore_params_dispose(&params);
	libxl_domain_config_dispose(&cfg);
	return rc;
}
*/
import "C"

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/fsutil"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// Hypervisor is one libxl context. libxl's calls are synchronous and run
// to the end once started (its own timeouts apply: 60 s for a guest to
// acknowledge a suspend); ctx is checked between them. Domains it
// restores have no xl process watching them: a guest that shuts down
// stays until destroyed, and is reported Paused, not Shutoff, because
// its device model still holds its disks.
type Hypervisor struct {
	mu  sync.RWMutex // calls hold it shared, Close exclusively
	ctx *C.libxl_ctx
	log *C.xls_logger

	stop, done chan struct{} // the SIGCHLD relay
}

var (
	_ xenlight.Hypervisor = (*Hypervisor)(nil)
	_ xenlight.LiveSaver  = (*Hypervisor)(nil)
)

// New opens a libxl context. Without Xen (or without the privilege to
// use it) the error wraps ErrNoXen.
func New() (*Hypervisor, error) {
	lg := C.xls_logger_new()
	if lg == nil {
		return nil, fmt.Errorf("%w: opening libxl: no memory for the logger", errdefs.ErrHypervisor)
	}
	since := C.xls_seq(lg)
	var ctx *C.libxl_ctx
	if rc := C.xls_ctx_alloc(lg, &ctx); rc != 0 {
		err := collect(lg, "opening libxl", rc, since)
		for _, m := range err.Log {
			if strings.Contains(m, "cannot open libxc handle") {
				err.sentinel = ErrNoXen
			}
		}
		C.xls_logger_free(lg)
		return nil, err
	}
	h := &Hypervisor{ctx: ctx, log: lg, stop: make(chan struct{}), done: make(chan struct{})}
	sig := make(chan os.Signal, 1) // signals coalesce: libxl checks all its children each time
	signal.Notify(sig, syscall.SIGCHLD)
	go h.relaySIGCHLD(sig)
	return h, nil
}

func (h *Hypervisor) relaySIGCHLD(sig chan os.Signal) {
	defer close(h.done)
	defer signal.Stop(sig)
	for {
		select {
		case <-sig:
			// Not under h.mu: a call holding it may be waiting for
			// exactly this child. Close stops the relay before freeing.
			C.libxl_childproc_sigchld_occurred(h.ctx)
		case <-h.stop:
			return
		}
	}
}

// Close waits for calls in progress and frees the context.
func (h *Hypervisor) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.ctx == nil {
		return nil
	}
	close(h.stop)
	<-h.done
	since := C.xls_seq(h.log)
	rc := C.libxl_ctx_free(h.ctx)
	var err error
	if rc != 0 {
		err = collect(h.log, "closing libxl", rc, since)
	}
	C.xls_logger_free(h.log)
	h.ctx, h.log = nil, nil
	return err
}

// collect makes the Error of a failed call from what libxl logged since.
func collect(lg *C.xls_logger, op string, rc C.int, since C.ulong) *Error {
	var log []string
	var last syscall.Errno
	buf := make([]byte, C.XLS_MSGLEN)
	for seq, end := since, C.xls_seq(lg); seq < end; seq++ {
		var errnoval C.int
		if C.xls_message(lg, seq, (*C.char)(unsafe.Pointer(&buf[0])), C.size_t(len(buf)), &errnoval) == 0 {
			continue // overwritten by later messages
		}
		m := C.GoString((*C.char)(unsafe.Pointer(&buf[0])))
		if errnoval > 0 {
			last = syscall.Errno(errnoval)
			m += ": " + last.Error()
		}
		log = append(log, m)
	}
	return newError(op, int(rc), log, last)
}

// call runs fn on the context and makes an Error of a failure.
func (h *Hypervisor) call(op string, fn func(*C.libxl_ctx) C.int) error {
	since := C.xls_seq(h.log)
	if rc := fn(h.ctx); rc != 0 {
		return collect(h.log, op, rc, since)
	}
	return nil
}

// begin takes the context for one method; end with h.mu.RUnlock.
func (h *Hypervisor) begin(ctx context.Context, op string) error {
	h.mu.RLock()
	if h.ctx == nil {
		h.mu.RUnlock()
		return fmt.Errorf("%s: %w", op, ErrClosed)
	}
	if err := ctx.Err(); err != nil {
		h.mu.RUnlock()
		return fmt.Errorf("%s: %w", op, err)
	}
	return nil
}

// domid looks a domain up by name; libxl_name_to_domid's "invalid" is
// its not found.
func (h *Hypervisor) domid(op, domain string) (C.uint32_t, error) {
	name := C.CString(domain)
	defer C.free(unsafe.Pointer(name))
	var id C.uint32_t
	err := h.call(op, func(c *C.libxl_ctx) C.int { return C.libxl_name_to_domid(c, name, &id) })
	var le *Error
	if errors.As(err, &le) && le.Code == codeInval {
		return 0, fmt.Errorf("%s: %w: %s", op, errdefs.ErrNoDomain, domain)
	}
	return id, err
}

// guest looks up a domain this package may stop: never Domain-0.
func (h *Hypervisor) guest(op, domain string) (C.uint32_t, error) {
	id, err := h.domid(op, domain)
	if err == nil && id == 0 {
		return 0, fmt.Errorf("%s: %w: %s is the control domain", op, errdefs.ErrOperationInvalid, domain)
	}
	return id, err
}

func (h *Hypervisor) state(op string, id C.uint32_t) (C.int, error) {
	var st C.int
	err := h.call(op, func(c *C.libxl_ctx) C.int { return C.xls_state(c, id, &st) })
	return st, err
}

// State reports the domain's state (libxl_domain_info). A domain libxl
// does not know, or that is dying, is Shutoff; one shut down but not yet
// destroyed, or stopped by a suspend (SaveMemoryLive), is Paused (see
// Hypervisor).
func (h *Hypervisor) State(ctx context.Context, domain string) (xenlight.State, error) {
	op := "reading the state of " + domain
	if err := h.begin(ctx, op); err != nil {
		return "", err
	}
	defer h.mu.RUnlock()
	id, err := h.domid(op, domain)
	if err == nil {
		var st C.int
		st, err = h.state(op, id)
		if err == nil {
			switch st {
			case C.XLS_RUNNING:
				return xenlight.Running, nil
			case C.XLS_PAUSED, C.XLS_SHUTDOWN, C.XLS_SUSPENDED:
				return xenlight.Paused, nil
			}
			return xenlight.Shutoff, nil
		}
	}
	if errors.Is(err, errdefs.ErrNoDomain) {
		return xenlight.Shutoff, nil
	}
	return "", err
}

func (h *Hypervisor) pause(op string, id C.uint32_t) error {
	return h.call(op, func(c *C.libxl_ctx) C.int { return C.libxl_domain_pause(c, id, nil) })
}

func (h *Hypervisor) unpause(op string, id C.uint32_t) error {
	return h.call(op, func(c *C.libxl_ctx) C.int { return C.libxl_domain_unpause(c, id, nil) })
}

// resumeCancel ends a suspend the domain goes on from (xl save -c):
// suspend_cancel=1 is the guest's co-operative resume.
func (h *Hypervisor) resumeCancel(op string, id C.uint32_t) error {
	return h.call(op, func(c *C.libxl_ctx) C.int { return C.libxl_domain_resume(c, id, 1, nil) })
}

func (h *Hypervisor) destroy(op string, id C.uint32_t) error {
	return h.call(op, func(c *C.libxl_ctx) C.int { return C.libxl_domain_destroy(c, id, nil) })
}

// onGuest runs fn on a guest domain (never Domain-0) under the context.
func (h *Hypervisor) onGuest(ctx context.Context, op, domain string, fn func(op string, id C.uint32_t) error) error {
	if err := h.begin(ctx, op); err != nil {
		return err
	}
	defer h.mu.RUnlock()
	id, err := h.guest(op, domain)
	if err != nil {
		return err
	}
	return fn(op, id)
}

// PausesVCPUs: Xen, not the device model, runs a guest's vCPUs
// (xenlight.VCPUPauser).
func (h *Hypervisor) PausesVCPUs(context.Context) (bool, error) { return true, nil }

// Pause pauses the domain (libxl_domain_pause).
func (h *Hypervisor) Pause(ctx context.Context, domain string) error {
	return h.onGuest(ctx, "pausing "+domain, domain, h.pause)
}

// Resume unpauses the domain (libxl_domain_unpause); one a suspend
// stopped (an interrupted SaveMemoryLive) goes on from it instead
// (libxl_domain_resume, suspend_cancel=1): unpausing does not wake it.
func (h *Hypervisor) Resume(ctx context.Context, domain string) error {
	return h.onGuest(ctx, "resuming "+domain, domain, func(op string, id C.uint32_t) error {
		st, err := h.state(op, id)
		if err != nil {
			return err
		}
		if st == C.XLS_SUSPENDED {
			return h.resumeCancel(op, id)
		}
		return h.unpause(op, id)
	})
}

// Destroy destroys the domain (libxl_domain_destroy).
func (h *Hypervisor) Destroy(ctx context.Context, domain string) error {
	return h.onGuest(ctx, "destroying "+domain, domain, h.destroy)
}

// Definition is the domain's configuration as libxl's JSON
// (libxl_retrieve_domain_configuration): the form Restore takes, after
// RepointDisks.
func (h *Hypervisor) Definition(ctx context.Context, domain string) (string, error) {
	var def string
	err := h.onGuest(ctx, "reading the configuration of "+domain, domain, func(op string, id C.uint32_t) error {
		var err error
		def, err = h.configJSON(op, id)
		return err
	})
	return def, err
}

func (h *Hypervisor) configJSON(op string, id C.uint32_t) (string, error) {
	var js *C.char
	if err := h.call(op, func(c *C.libxl_ctx) C.int { return C.xls_config_json(c, id, &js) }); err != nil {
		return "", err
	}
	defer C.free(unsafe.Pointer(js))
	return C.GoString(js), nil
}

// SaveMemory saves the domain as xl save does (libxl_domain_suspend),
// into an xl save file that `xl restore` takes too. Without checkpoint
// the domain is then destroyed; with it, the suspend is cancelled
// (libxl_domain_resume, suspend_cancel=1: xl save -c) and the domain
// goes on in the state it had. A suspend needs the guest to run until
// it acknowledges it, so a paused domain is unpaused for the save and
// paused again before its resume: it then stands at the saved point.
// The image is synced before the domain is destroyed or resumed.
func (h *Hypervisor) SaveMemory(ctx context.Context, domain, path string, checkpoint bool) error {
	end := afterDestroy
	if checkpoint {
		end = afterGoOn
	}
	return h.onGuest(ctx, "saving the memory of "+domain, domain, func(op string, id C.uint32_t) error {
		_, err := h.save(ctx, op, id, path, 0, end)
		return err
	})
}

// SaveMemoryLive saves the domain's memory as live migration sends it
// (libxl_domain_suspend with LIBXL_SUSPEND_LIVE): the guest runs while
// its memory is copied in rounds, each sending the pages the last one
// dirtied, and is stopped by a suspend only for the last. It returns
// with the guest still stopped at the saved point, so what must match
// the memory (the disks) can be taken in that window; resume lets the
// guest go on from the suspend (libxl_domain_resume, suspend_cancel=1,
// as xl save -c), paused again first if it was paused. Until resume is
// called, State reports the domain Paused and Resume ends the suspend
// too, so a crash in the window is recovered by a plain Resume. Errors
// are those of SaveMemory; on one the guest has already gone on. A Xen
// that cannot track the pages the guest dirties (log-dirty: shadow
// paging for PV, HAP or shadow for HVM and PVH, as libxl_physinfo
// reports) is xenlight.ErrLiveUnsupported before anything is written.
func (h *Hypervisor) SaveMemoryLive(ctx context.Context, domain, path string) (resume func(context.Context) error, err error) {
	var paused bool
	err = h.onGuest(ctx, "saving the memory of "+domain+" live", domain, func(op string, id C.uint32_t) error {
		var ok, pv C.int
		if err := h.call(op, func(c *C.libxl_ctx) C.int { return C.xls_can_log_dirty(c, id, &ok, &pv) }); err != nil {
			return err
		}
		if ok == 0 {
			need := "hardware-assisted paging or shadow paging"
			if pv != 0 {
				need = "shadow paging (CONFIG_SHADOW_PAGING) for a PV domain"
			}
			return fmt.Errorf("%s: %w: this Xen cannot track the pages the guest writes while its memory is copied (log-dirty needs %s)", op, xenlight.ErrLiveUnsupported, need)
		}
		var err error
		paused, err = h.save(ctx, op, id, path, C.LIBXL_SUSPEND_LIVE, stayStopped)
		return err
	})
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		return h.onGuest(ctx, "resuming "+domain+" after its live save", domain, func(op string, id C.uint32_t) error {
			return h.goOn(op, id, paused)
		})
	}, nil
}

// saveEnd is what save does with the domain once its memory is saved.
type saveEnd int

const (
	afterDestroy saveEnd = iota // xl save
	afterGoOn                   // xl save -c
	stayStopped                 // the caller ends the suspend
)

// save writes the xl save file; it reports whether the domain was
// paused before (and so is to be paused again when it goes on).
func (h *Hypervisor) save(ctx context.Context, op string, id C.uint32_t, path string, flags C.int, end saveEnd) (bool, error) {
	st, err := h.state(op, id)
	if err != nil {
		return false, err
	}
	if st != C.XLS_RUNNING && st != C.XLS_PAUSED {
		return false, fmt.Errorf("%s: %w: the domain is shut down", op, errdefs.ErrOperationInvalid)
	}
	paused := st == C.XLS_PAUSED
	config, err := h.configJSON(op, id)
	if err != nil {
		return paused, err
	}

	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return paused, fmt.Errorf("%s: %w", op, err)
	}
	complete := false
	defer func() {
		if !complete {
			// No image is better than a partial one; a complete one
			// stays even if what follows fails: it holds the guest.
			f.Close()
			os.Remove(path)
		}
	}()
	if err := writeXLHeader(f, config); err != nil {
		return paused, fmt.Errorf("%s: %w", op, err)
	}
	if err := ctx.Err(); err != nil {
		return paused, fmt.Errorf("%s: %w", op, err)
	}
	if paused {
		// A paused guest must not run through pre-copy rounds: it runs
		// only until it acknowledges the suspend, as in a plain save.
		flags &^= C.LIBXL_SUSPEND_LIVE
		if err := h.unpause(op, id); err != nil {
			return paused, err
		}
	}
	fd := C.int(f.Fd())
	err = h.call(op, func(c *C.libxl_ctx) C.int { return C.libxl_domain_suspend(c, id, fd, flags, nil) })
	runtime.KeepAlive(f)
	if err == nil {
		if err = syncFile(f); err != nil {
			err = fmt.Errorf("%s: %w", op, err)
		}
	}
	if err != nil {
		// As xl: cancel the suspend and the guest goes on where it
		// was, paused again if it was.
		return paused, errors.Join(err, h.goOn(op, id, paused))
	}
	complete = true
	switch end {
	case afterGoOn:
		return paused, h.goOn(op, id, paused)
	case stayStopped:
		return paused, nil
	}
	return paused, h.destroy(op, id)
}

// goOn ends a suspend: the domain resumes where it was suspended, paused
// first if it was (xl save -p), so it does not run a moment.
func (h *Hypervisor) goOn(op string, id C.uint32_t, paused bool) error {
	if paused {
		if err := h.pause(op, id); err != nil {
			return err
		}
	}
	return h.resumeCancel(op, id)
}

// syncFile makes the image durable before the domain it holds is
// destroyed: the file's data and its entry in the folder.
func syncFile(f *os.File) error {
	err := f.Sync()
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return err
	}
	return fsutil.SyncDir(filepath.Dir(f.Name()))
}

// Restore creates the domain from an xl save file (libxl_domain_create_
// restore) with definition, whose disks libxl opens, not those saved in
// the image. definition is libxl's JSON domain configuration (see
// Definition and RepointDisks) or the domain's libvirt XML, whose disk
// sources repoint the configuration saved in the image (see
// restoreConfig). xl config files are ErrUnsupported: libxenlight does
// not parse them. Unlike xl, no memory is ballooned out of Domain-0 for
// the domain.
func (h *Hypervisor) Restore(ctx context.Context, domain, path, definition string, paused bool) error {
	op := "restoring " + domain
	if strings.TrimSpace(definition) == "" {
		return fmt.Errorf("%s: %w: a restore needs the domain configuration with the disks it is to use", op, errdefs.ErrInvalidArg)
	}
	if err := h.begin(ctx, op); err != nil {
		return err
	}
	defer h.mu.RUnlock()
	if _, err := h.domid(op, domain); err == nil {
		return fmt.Errorf("%s: %w: the domain is running", op, errdefs.ErrOperationInvalid)
	} else if !errors.Is(err, errdefs.ErrNoDomain) {
		return err
	}
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	defer f.Close()
	version, saved, err := readXLHeader(f)
	if errors.Is(err, errNotXLImage) {
		err = fmt.Errorf("%w: %s: %v", errdefs.ErrInvalidArg, path, err)
	}
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}
	definition, err = restoreConfig(domain, definition, saved)
	if err != nil {
		return fmt.Errorf("%s: %w", op, err)
	}

	def := C.CString(definition)
	defer C.free(unsafe.Pointer(def))
	fd := C.int(f.Fd())
	var parsed C.int
	var id C.uint32_t
	err = h.call(op, func(c *C.libxl_ctx) C.int {
		return C.xls_restore(c, def, fd, C.int(version), &parsed, &id)
	})
	runtime.KeepAlive(f)
	if err != nil {
		var le *Error
		if parsed == 0 && errors.As(err, &le) && le.sentinel == errdefs.ErrHypervisor {
			le.sentinel = errdefs.ErrInvalidArg // libxl refused the configuration
		}
		return err
	}
	if !paused {
		return h.unpause(op, id)
	}
	return nil
}

// DeviceModel connects to the QMP socket libxl gives the domain's device
// model (xenlight.LibxlQMPSocket).
func (h *Hypervisor) DeviceModel(ctx context.Context, domain string) (*qmp.Monitor, error) {
	var id C.uint32_t
	// The monitor outlives the lookup: it is dialled outside the lock.
	err := h.onGuest(ctx, "connecting to the device model of "+domain, domain, func(_ string, guest C.uint32_t) error {
		id = guest
		return nil
	})
	if err != nil {
		return nil, err
	}
	return qmp.Dial(ctx, "unix", xenlight.LibxlQMPSocket(uint32(id)))
}

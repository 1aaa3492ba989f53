package libvirt

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	lv "libvirt.org/go/libvirt"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/internal/virterr"
)

// ErrNoConnection: the libvirt daemon cannot be reached (its socket
// refuses connections: it is down), or the connection to it was lost on
// the way (it exited or restarted, or stopped answering keepalive). It
// wraps errdefs.ErrHypervisor; the error's libvirt code is
// VIR_ERR_SYSTEM_ERROR (38), what libvirt reports for a refused connection
// and for the call that finds its connection broken, where libvirt's
// later calls on that connection say VIR_ERR_INTERNAL_ERROR ("client
// socket is closed"). The next call connects again.
var ErrNoConnection = fmt.Errorf("%w: no connection to the libvirt daemon", errdefs.ErrHypervisor)

// connError is a call that failed for want of a connection: ErrNoConnection
// and libvirt's own error.
type connError struct {
	op  string
	uri string
	err error
}

func (e *connError) Error() string {
	msg := fmt.Sprintf("no connection to the libvirt daemon at %s: %v", e.uri, e.err)
	if e.op == "" {
		return msg
	}
	return e.op + ": " + msg
}

// LibvirtCode is VIR_ERR_SYSTEM_ERROR whatever libvirt said (see
// ErrNoConnection).
func (e *connError) LibvirtCode() int { return int(errdefs.CodeSystemError) }

func (e *connError) Unwrap() []error { return []error{ErrNoConnection, e.err} }

// Keepalive is virConnectSetKeepAlive's setting: after Interval seconds
// without a word from the daemon the client pings it, and after Count
// pings unanswered in a row it closes the connection. A call waiting on a
// daemon that stopped answering (hung, or its host gone) then fails with
// ErrNoConnection after about Interval×(Count+1) seconds (Bound), instead
// of waiting for ever: libvirt's calls block in C and take no deadline.
// A new connection is given up on after Bound too (virConnectOpen has no
// timeout, and keepalive starts only once it is open), and until the
// daemon answers it, later calls fail at once: an xlsnap call on a hung
// daemon fails after at most twice Bound. Interval 0 turns keepalive and
// those bounds off: a hung daemon then hangs its caller.
type Keepalive struct {
	Interval int
	Count    uint
}

// Bound is how long a daemon that answers nothing is waited for: 0 for
// no bound.
func (k Keepalive) Bound() time.Duration {
	if k.Interval <= 0 {
		return 0
	}
	return time.Duration(k.Interval) * time.Duration(k.Count+1) * time.Second
}

// DefaultKeepalive is virsh's (its -k and -K defaults): a hung daemon is
// given up on after 35 s.
var DefaultKeepalive = Keepalive{Interval: 5, Count: 6}

// Conn is a connection to one libvirt URI that outlives a restart of the
// daemon behind it, as virsh's does (virshReconnect): a call finding the
// connection lost gets ErrNoConnection, and the next call connects again
// (a daemon that is still down refuses it at once, ErrNoConnection
// again). Every connection it opens has keepalive on (see Keepalive). It
// is safe for concurrent use.
type Conn struct {
	uri   string
	canon string
	ka    Keepalive

	mu   sync.Mutex
	cur  *lv.Connect
	own  bool // cur is Conn's to close
	lost []*lv.Connect
	// opening is a connection being made that its caller stopped
	// waiting for (the daemon answered nothing in the bound): the next
	// calls take its answer if it came, and fail at once if not, rather
	// than each waiting the bound again on a hung daemon.
	opening <-chan opened
	// closed: Close ran; no call connects again.
	closed bool
}

// Dial connects to uri with keepalive ka (DefaultKeepalive, unless a
// caller wants a hung daemon found sooner or later). A connection keeps
// the keepalive it was opened with (libvirt starts it once), and so do
// the ones Conn opens later.
//
// Errors: libvirt's, with its code (VIR_ERR_SYSTEM_ERROR, 38, for a
// daemon that refuses the connection); ErrNoConnection (38) for one that
// takes it but answers nothing in ka's Bound.
func Dial(uri string, ka Keepalive) (*Conn, error) {
	ch := open(uri, ka)
	r, err := await(context.Background(), ch, ka)
	if err != nil {
		go closeLate(ch)
		return nil, &connError{op: "connecting", uri: uri, err: err}
	}
	if r.err != nil {
		return nil, wrap("connecting to "+uri, r.err)
	}
	c := &Conn{uri: uri, canon: canonical(r.c, uri), ka: ka, cur: r.c, own: true}
	dialed.Store(r.c, c)
	return c, nil
}

// dialed maps each libvirt connection a Conn made to that Conn, so that
// New given one shares its Conn (see New).
var dialed sync.Map

// connOf is the Conn that made c, if one did.
func connOf(c *lv.Connect) (*Conn, bool) {
	v, ok := dialed.Load(c)
	if !ok {
		return nil, false
	}
	return v.(*Conn), true
}

// borrow wraps a connection its caller opened and closes: Conn connects
// again, to the same URI, once it is lost, and closes only what it
// opened itself.
func borrow(c *lv.Connect) *Conn {
	canon := canonical(c, "")
	return &Conn{uri: canon, canon: canon, ka: DefaultKeepalive, cur: c}
}

// canonical is libvirt's name for the connection's URI (virConnectGetURI,
// which asks nothing of the daemon), or fallback if it has none.
func canonical(c *lv.Connect, fallback string) string {
	if uri, err := c.GetURI(); err == nil {
		return uri
	}
	return fallback
}

// opened is the outcome of open.
type opened struct {
	c   *lv.Connect
	err error
}

// open connects to uri with keepalive ka in the background: libvirt's
// open blocks in C without a timeout of its own. A driver without
// keepalive (the in-process test driver) has nothing to hang on.
func open(uri string, ka Keepalive) <-chan opened {
	ch := make(chan opened, 1)
	go func() {
		if err := startEvents(); err != nil {
			ch <- opened{err: err}
			return
		}
		c, err := lv.NewConnect(uri)
		if err == nil {
			if err = c.SetKeepAlive(ka.Interval, ka.Count); err != nil && virterr.Code(err) != lv.ERR_NO_SUPPORT {
				c.Close()
				c = nil
			} else {
				err = nil
			}
		}
		ch <- opened{c, err}
	}()
	return ch
}

// errNoAnswer: the daemon took the connection and answered nothing.
var errNoAnswer = errors.New("the daemon answered nothing")

// await waits for open's outcome at most ka's Bound, or until ctx ends.
// Errors: errNoAnswer after the bound; ctx's.
func await(ctx context.Context, ch <-chan opened, ka Keepalive) (opened, error) {
	var bound <-chan time.Time
	if b := ka.Bound(); b > 0 {
		t := time.NewTimer(b)
		defer t.Stop()
		bound = t.C
	}
	select {
	case r := <-ch:
		return r, nil
	case <-bound:
		return opened{}, fmt.Errorf("%w in %v", errNoAnswer, ka.Bound())
	case <-ctx.Done():
		return opened{}, ctx.Err()
	}
}

// closeLate closes the connection an abandoned open makes, if it makes one.
func closeLate(ch <-chan opened) {
	if r := <-ch; r.c != nil {
		r.c.Close()
	}
}

// events is libvirt's default event loop, run for the whole process on a
// goroutine of its own: keepalive needs one (libvirt pings and watches
// the socket from it), and must have it before a connection opens. A
// program that registers an event loop of its own before its first
// connection keeps it: libvirt ignores a second one.
var events struct {
	once sync.Once
	err  error
}

func startEvents() error {
	events.once.Do(func() {
		if events.err = lv.EventRegisterDefaultImpl(); events.err != nil {
			return
		}
		go func() {
			for {
				if lv.EventRunDefaultImpl() != nil {
					// A loop that fails (poll itself failing) would
					// fail again at once: not in a tight spin.
					time.Sleep(time.Second)
				}
			}
		}()
	})
	return events.err
}

// URI is libvirt's name for the connection's URI, as it was when the
// connection was made: the same after the daemon restarts, and while it
// is down.
func (c *Conn) URI() string { return c.canon }

// Current is the connection as it stands, perhaps lost: for callers that
// need more of libvirt, and handle a lost one themselves.
func (c *Conn) Current() *lv.Connect {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cur
}

// Get returns a live connection: the one it has, or a new one when that
// one was lost. A daemon that answers nothing is waited for once, for
// the keepalive's Bound; until it answers, the calls after that fail at
// once. (Calls wait for each other here, without their contexts.)
//
// Errors: ErrNoConnection when the daemon refuses a new connection, or
// answers nothing, or Conn was closed; ctx's when it ends first.
func (c *Conn) Get(ctx context.Context) (*lv.Connect, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil, &connError{op: "using a closed connection", uri: c.uri, err: net.ErrClosed}
	}
	if alive, err := c.cur.IsAlive(); err == nil && alive {
		return c.cur, nil
	}
	ch := c.opening
	c.opening = nil
	if ch != nil {
		select {
		case r := <-ch:
			return c.adopt(r)
		default:
			c.opening = ch
			return nil, &connError{op: "connecting again", uri: c.uri, err: fmt.Errorf("%w yet", errNoAnswer)}
		}
	}
	ch = open(c.uri, c.ka)
	r, err := await(ctx, ch, c.ka)
	if err != nil {
		c.opening = ch
		if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
			return nil, fmt.Errorf("connecting again to %s: %w", c.uri, err)
		}
		return nil, &connError{op: "connecting again", uri: c.uri, err: err}
	}
	return c.adopt(r)
}

// adopt makes a new connection the current one. Callers hold c.mu.
func (c *Conn) adopt(r opened) (*lv.Connect, error) {
	if r.err != nil {
		return nil, &connError{op: "connecting again", uri: c.uri, err: r.err}
	}
	// Another goroutine may still be in a call on the lost connection:
	// it is freed when Conn is closed, not now.
	if c.own {
		c.lost = append(c.lost, c.cur)
	}
	c.cur, c.own = r.c, true
	dialed.Store(r.c, c)
	return r.c, nil
}

// Close closes every connection Conn opened. A borrowed one stays its
// owner's, and while Conn still uses it (it was never lost), Conn
// goes on working through it.
//
// Errors: libvirt's, closing.
func (c *Conn) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	var errs error
	conns := c.lost
	if c.own {
		conns = append(conns, c.cur)
		c.closed = true
	}
	for _, lc := range conns {
		dialed.Delete(lc)
		if _, err := lc.Close(); err != nil {
			errs = errors.Join(errs, wrap("closing the connection", err))
		}
	}
	if c.opening != nil {
		go closeLate(c.opening)
	}
	c.lost, c.opening = nil, nil
	return errs
}

// Wrap makes err, from operation op on connection conn (which Get gave),
// one of xlsnap's errors: ErrNoConnection when conn is no longer alive
// (the call found it lost, or it was lost under the call), else
// libvirt's error with its code, override replacing the sentinel of the
// codes it names (virterr.Wrap).
func (c *Conn) Wrap(conn *lv.Connect, op string, err error, override map[lv.ErrorNumber]error) error {
	var le lv.Error
	if errors.As(err, &le) {
		if alive, aerr := conn.IsAlive(); aerr == nil && !alive {
			return &connError{op: op, uri: c.uri, err: le}
		}
	}
	return virterr.Wrap(op, err, override)
}

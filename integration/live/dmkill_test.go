package live

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage/storagetest"
	"github.com/xlsnap/xlsnap/xenlight/qemutest"
)

// The device model SIGKILLed in the middle of a live operation: the
// call fails typed, the domain is shut off, and the next call finishes
// or undoes the operation from the journal and the images (storage's
// RecoverOffline) with every byte the guest wrote before the kill read
// back, the exact chain on disk and in the records, and qemu-img check
// clean.

// killPoint is where in a QMP exchange the killer strikes.
type killPoint int

const (
	// killBefore: the matched command never reaches QEMU.
	killBefore killPoint = iota
	// killAnswered: QEMU answered the command (a job started) and the
	// driver got the answer; the guest writes, then QEMU dies.
	killAnswered
	// killUnanswered: QEMU carried out the command; it dies before the
	// driver hears the answer.
	killUnanswered
	// killAtEvent: QEMU sent the matched event (a job done); it dies
	// before the driver hears it.
	killAtEvent
)

// killer stands between the driver and the device model's QMP socket
// (which moves aside, as proxied does) and SIGKILLs QEMU at one point of
// the exchange. Just before the kill it can slow the job the matched
// command started to a crawl (so that the kill lands mid-job, whatever
// the machine's speed) and make the guest write through its disk device
// (qemu-io -d on the device, the guest's own path), both on QEMU's side
// of the connection, unseen by the driver. Once QEMU is dead it stops
// listening: a dead device model's socket answers nobody.
type killer struct {
	e     *env
	l     net.Listener
	real  string
	match []string // all in the line: a command's, or an event's name
	point killPoint
	slow  bool
	guest []string // HMP qemu-io command lines
	// await, if set, is an event the killer waits for once QEMU answered
	// the matched command, before the guest writes and the kill: the
	// job's end, say (QEMU pivoted).
	await string
	// earlyAt, if set, is an event at which (once) the guest writes
	// early (HMP qemu-io command lines) before QEMU's event goes on to
	// the driver: a running guest's writes at that point of the job.
	earlyAt string
	early   []string
	killed  chan struct{}

	mu         sync.Mutex
	done       bool
	wroteEarly bool
	errs       []string
	events     []string // the events QEMU sent before the kill
}

func startKiller(e *env, match []string, point killPoint, slow bool, guest ...string) *killer {
	e.t.Helper()
	return (&killer{match: match, point: point, slow: slow, guest: guest}).start(e)
}

// start puts k in front of e's device model.
func (k *killer) start(e *env) *killer {
	e.t.Helper()
	real := e.path("vm.real.qmp")
	if err := os.Rename(e.path("vm.qmp"), real); err != nil {
		e.t.Fatal(err)
	}
	l, err := net.Listen("unix", e.path("vm.qmp"))
	if err != nil {
		e.t.Fatal(err)
	}
	k.e, k.l, k.real, k.killed = e, l, real, make(chan struct{})
	var wg sync.WaitGroup
	e.t.Cleanup(func() { l.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				k.serve(c)
			}()
		}
	}()
	return k
}

// guestWrite is a qemu-io command line writing pattern over one MiB at
// off through the disk's device, as the guest does.
func guestWrite(dev string, pattern byte, off int) string {
	return fmt.Sprintf("qemu-io -d /machine/peripheral/%s/virtio-backend \"write -P 0x%02x %d %d\"", dev, pattern, off, mib)
}

func guestFlush(dev string) string {
	return fmt.Sprintf("qemu-io -d /machine/peripheral/%s/virtio-backend flush", dev)
}

func (k *killer) fail(format string, args ...any) {
	k.mu.Lock()
	defer k.mu.Unlock()
	k.errs = append(k.errs, fmt.Sprintf(format, args...))
}

// wait waits for the kill and fails the test with what went wrong on
// QEMU's side of the connection.
func (k *killer) wait() {
	k.e.t.Helper()
	select {
	case <-k.killed:
	case <-time.After(30 * time.Second):
		k.e.t.Fatal("the device model was not killed")
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.errs) > 0 {
		k.e.t.Fatalf("before the kill: %s", strings.Join(k.errs, "; "))
	}
	k.e.t.Logf("QEMU's events before the kill: %v", k.events)
}

// lines reads c line by line until it closes or done is.
func lines(c net.Conn, done chan struct{}) chan []byte {
	ch := make(chan []byte)
	go func() {
		defer close(ch)
		r := bufio.NewReader(c)
		for {
			b, err := r.ReadBytes('\n')
			if len(b) > 0 {
				select {
				case ch <- b:
				case <-done:
					return
				}
			}
			if err != nil {
				return
			}
		}
	}()
	return ch
}

// eventOf is the event a QMP line carries, "" for an answer.
func eventOf(b []byte) string {
	var msg struct {
		Event string `json:"event"`
	}
	json.Unmarshal(b, &msg)
	return msg.Event
}

func (k *killer) serve(client net.Conn) {
	defer client.Close()
	server, err := net.Dial("unix", k.real)
	if err != nil {
		return
	}
	defer server.Close()
	done := make(chan struct{})
	defer close(done)
	fromQEMU, fromDriver := lines(server, done), lines(client, done)
	for {
		select {
		case b, ok := <-fromDriver:
			if !ok {
				return
			}
			if k.point != killAtEvent && k.matches(b) && k.strike() {
				if k.point != killBefore {
					server.Write(b)
					answer := k.answer(fromQEMU)
					if bytes.Contains(answer, []byte(`"error"`)) {
						k.fail("QEMU refused %s: %s", b, answer)
					}
					if k.point == killAnswered {
						client.Write(answer)
					}
					if k.await != "" {
						k.awaitEvent(fromQEMU)
					}
				}
				k.work(b, server, fromQEMU)
				k.kill()
				return
			}
			server.Write(b)
		case b, ok := <-fromQEMU:
			if !ok {
				return
			}
			if ev := eventOf(b); ev != "" {
				k.mu.Lock()
				k.events = append(k.events, ev)
				k.mu.Unlock()
				if k.point == killAtEvent && ev == k.match[0] && k.strike() {
					k.work(nil, server, fromQEMU)
					k.kill()
					return
				}
				if k.writeEarly(ev) {
					k.run(server, fromQEMU, guestCmds(k.early))
				}
			}
			client.Write(b)
		}
	}
}

// answer reads QEMU's lines up to the next answer; the events on the way
// are recorded, and reach the driver no more.
func (k *killer) answer(fromQEMU chan []byte) []byte {
	for b := range fromQEMU {
		ev := eventOf(b)
		if ev == "" {
			return b
		}
		k.mu.Lock()
		k.events = append(k.events, ev)
		k.mu.Unlock()
	}
	k.fail("QEMU closed the connection before it answered")
	return nil
}

func (k *killer) matches(b []byte) bool {
	for _, m := range k.match {
		if !bytes.Contains(b, []byte(m)) {
			return false
		}
	}
	return true
}

// strike reports whether this is the one strike (the first match).
func (k *killer) strike() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.done {
		return false
	}
	k.done = true
	return true
}

// work slows the job cmd started (block-job-set-speed on its job-id)
// and makes the guest write, on QEMU's side of the connection.
func (k *killer) work(cmd []byte, server net.Conn, fromQEMU chan []byte) {
	var cmds []map[string]any
	if k.slow {
		var c struct {
			Arguments struct {
				JobID string `json:"job-id"`
			} `json:"arguments"`
		}
		json.Unmarshal(cmd, &c)
		cmds = append(cmds, map[string]any{"execute": "block-job-set-speed", "arguments": map[string]any{"device": c.Arguments.JobID, "speed": 1}})
	}
	k.run(server, fromQEMU, append(cmds, guestCmds(k.guest)...))
}

// guestCmds are HMP command lines as QMP commands.
func guestCmds(lines []string) []map[string]any {
	var cmds []map[string]any
	for _, g := range lines {
		cmds = append(cmds, map[string]any{"execute": "human-monitor-command", "arguments": map[string]any{"command-line": g}})
	}
	return cmds
}

// run sends QEMU commands of the killer's own and checks their answers.
func (k *killer) run(server net.Conn, fromQEMU chan []byte, cmds []map[string]any) {
	for _, c := range cmds {
		b, _ := json.Marshal(c)
		server.Write(append(b, '\n'))
		answer := k.answer(fromQEMU)
		var r struct {
			Return json.RawMessage `json:"return"`
			Error  json.RawMessage `json:"error"`
		}
		json.Unmarshal(answer, &r)
		// qemu-io reports its failures as output, not as QMP errors.
		if r.Error != nil || c["execute"] == "human-monitor-command" && string(r.Return) != `""` {
			k.fail("%s: %s", b, answer)
		}
	}
}

// writeEarly reports whether the early writes are to be made at ev:
// the first time QEMU sends k.earlyAt.
func (k *killer) writeEarly(ev string) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.wroteEarly || ev != k.earlyAt {
		return false
	}
	k.wroteEarly = true
	return true
}

// awaitEvent reads QEMU's lines up to the event k.await; those on the
// way are recorded, and reach the driver no more.
func (k *killer) awaitEvent(fromQEMU chan []byte) {
	for b := range fromQEMU {
		ev := eventOf(b)
		if ev == "" {
			continue
		}
		k.mu.Lock()
		k.events = append(k.events, ev)
		k.mu.Unlock()
		if ev == k.await {
			return
		}
	}
	k.fail("QEMU closed the connection before it sent %s", k.await)
}

// kill SIGKILLs QEMU and waits until it is gone (its files closed, its
// image locks released), without reaping it (qemutest's waiter does);
// then the socket goes.
func (k *killer) kill() {
	p := k.e.qemu.Cmd.Process
	if err := p.Kill(); err != nil {
		k.fail("kill: %v", err)
	}
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, p.Pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if !errors.Is(err, syscall.EINTR) {
			break // nil, or ECHILD: reaped already
		}
	}
	k.l.Close()
	close(k.killed)
}

// before asserts that QEMU had sent none of events when it died: the
// kill landed before those points of the job.
func (k *killer) before(events ...string) {
	k.e.t.Helper()
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, ev := range events {
		if slices.Contains(k.events, ev) {
			k.e.t.Fatalf("QEMU sent %s before the kill (%v): not the point this test is about", ev, k.events)
		}
	}
}

// afterKill is the first call once the device model is dead: it must
// succeed, having finished or undone the operation offline.
func (e *env) afterKill() []string {
	e.t.Helper()
	return e.firstCallAfter("the kill")
}

// expectKilledCall asserts the call QEMU died in failed with a typed
// error.
func expectKilledCall(t *testing.T, err error) {
	t.Helper()
	if err == nil {
		t.Fatal("the call QEMU was killed in succeeded")
	}
	t.Logf("the call QEMU was killed in: %v (code %d)", err, driver.Code(err))
	if driver.Code(err) == errdefs.CodeInternal {
		t.Fatalf("untyped error: %v", err)
	}
}

// offChain asserts a disk's chain with QEMU gone: the records' and the
// headers' (qemu-img), by file name, and qemu-img check on its images.
func (e *env) offChain(target string, want ...string) {
	e.t.Helper()
	rec := e.disk(target).Chain
	var got []string
	for _, p := range rec {
		got = append(got, filepath.Base(p))
	}
	if !slices.Equal(got, want) {
		e.t.Fatalf("%s: recorded chain %v, want %v", target, got, want)
	}
	out := storagetest.Run(e.t, "qemu-img", "info", "--backing-chain", "--output=json", "-f", "qcow2", rec[0])
	var infos []struct{ Filename string }
	if err := json.Unmarshal([]byte(out), &infos); err != nil {
		e.t.Fatal(err)
	}
	got = got[:0]
	for _, i := range infos {
		got = append(got, filepath.Base(i.Filename))
	}
	if !slices.Equal(got, want) {
		e.t.Fatalf("%s: the headers chain %v, want %v", target, got, want)
	}
	for _, p := range rec {
		storagetest.Run(e.t, "qemu-img", "check", "-q", "-f", "qcow2", p)
	}
}

func (e *env) gone(names ...string) {
	e.t.Helper()
	for _, n := range names {
		if _, err := os.Stat(e.path(n)); !errors.Is(err, os.ErrNotExist) {
			e.t.Fatalf("%s is still there (%v)", n, err)
		}
	}
}

// bulk is where seedBulk writes 32 MiB into the base and again into
// layer a: enough work for a job that the killer's slowing lands first.
const bulk = 8 * mib

// seedBulk is seedLive("a", "b") with 32 MiB from bulk written into the
// base (0x1a) and over it into layer a (0x2a).
func (e *env) seedBulk() {
	e.t.Helper()
	e.write("xvda", 0x11, 0)
	e.writeLen("xvda", 0x1a, bulk, 32*mib)
	e.write("xvdb", 0x51, 0)
	e.layer("a")
	e.write("xvda", 0x22, mib)
	e.writeLen("xvda", 0x2a, bulk, 32*mib)
	e.layer("b")
	e.write("xvda", 0x33, 2*mib)
}

// writeLen is write over length bytes.
func (e *env) writeLen(target string, pattern byte, off, length int) {
	e.t.Helper()
	active := e.disk(target).Source
	for _, c := range e.chains() {
		if c.Files[0] == active {
			m, err := e.h.DeviceModel(e.ctx, "vm")
			if err != nil {
				e.t.Fatal(err)
			}
			defer m.Disconnect()
			if err := qemutest.GuestWrite(e.ctx, m, c.Node, pattern, off, length); err != nil {
				e.t.Fatal(err)
			}
			return
		}
	}
	e.t.Fatalf("the device model does not write %s's recorded layer %s: %+v", target, active, e.chains())
}

// expectBulk asserts what seedBulk wrote from bulk on reads through xvda.
func (e *env) expectBulk() {
	e.t.Helper()
	storagetest.ExpectImage(e.t, e.disk("xvda").Source, "qcow2", 0x2a, bulk, 32*mib)
}

// TestFaultDeviceModelKilledMidCommit: the device model is SIGKILLed
// while a snapshot delete's commit of the active layer runs (slowed to a
// crawl, so the kill lands mid-job), the guest having written into that
// layer during the job. The call fails typed; the domain is shut off,
// so the next call finishes the merge offline (qemu-img commit writes
// into the base only what the layer holds: redoing it is harmless) and
// nothing written before the kill is lost.
func TestFaultDeviceModelKilledMidCommit(t *testing.T) {
	e := newEnv(t)
	e.write("xvda", 0x81, 0)
	e.write("xvdb", 0x41, 0)
	if _, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>k1</name></domainsnapshot>", driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 32; i++ {
		e.write("xvda", byte(0x90+i%16), (1+i)*mib)
	}
	e.write("xvdb", 0x42, mib)
	k := startKiller(e, []string{`"block-commit"`, `vm-xvda.k1"`}, killAnswered, true,
		guestWrite("dev0", 0xe1, 0), guestWrite("dev0", 0xe2, 40*mib), guestFlush("dev0"))
	_, err := e.d.SnapshotDelete(e.ctx, "vm", "k1", 0)
	expectKilledCall(t, err)
	k.wait()
	k.before("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED")
	if names := e.afterKill(); len(names) != 0 {
		t.Fatalf("after recovery: snapshots %v, want k1 deleted", names)
	}
	e.offChain("xvda", "vm-xvda.qcow2")
	e.offChain("xvdb", "vm-xvdb.qcow2")
	e.gone("vm-xvda.k1", "vm-xvdb.k1")
	e.expect("xvda", 0xe1, 0)
	for i := 0; i < 32; i++ {
		e.expect("xvda", byte(0x90+i%16), (1+i)*mib)
	}
	e.expect("xvda", 0xe2, 40*mib)
	e.expect("xvdb", 0x41, 0)
	e.expect("xvdb", 0x42, mib)
}

// TestFaultDeviceModelKilledBlockCommit: blockcommit's device model is
// SIGKILLed mid-job (a middle layer, slowed), when an active commit is
// READY (before the driver hears it, so before any pivot: the guest's
// writes since are in both images), and when a middle commit completed
// (QEMU rewrote the active layer's header, but nobody flushed the base's
// tables). Each time the commit is redone offline from the layer, which
// stays until the operation commits.
func TestFaultDeviceModelKilledBlockCommit(t *testing.T) {
	for _, tc := range []struct {
		name     string
		active   bool
		match    []string
		point    killPoint
		chain    []string
		gone     []string
		readBack []byte // xvda's patterns at 0, 1, 2, 3 MiB
	}{
		{"middle-mid-job", false, []string{`"block-commit"`}, killAnswered,
			[]string{"vm-xvda.b", "vm-xvda.qcow2"}, []string{"vm-xvda.a"}, []byte{0xe3, 0x22, 0x33, 0xe4}},
		{"middle-completed", false, []string{"BLOCK_JOB_COMPLETED"}, killAtEvent,
			[]string{"vm-xvda.b", "vm-xvda.qcow2"}, []string{"vm-xvda.a"}, []byte{0xe3, 0x22, 0x33, 0xe4}},
		{"active-ready", true, []string{"BLOCK_JOB_READY"}, killAtEvent,
			[]string{"vm-xvda.qcow2"}, []string{"vm-xvda.a", "vm-xvda.b"}, []byte{0xe3, 0x22, 0x33, 0xe4}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.seedBulk()
			k := startKiller(e, tc.match, tc.point, tc.point == killAnswered,
				guestWrite("dev0", 0xe3, 0), guestWrite("dev0", 0xe4, 3*mib), guestFlush("dev0"))
			var err error
			if tc.active {
				_, err = e.d.BlockCommit(e.ctx, "vm", "xvda", "", "", 0, driver.BlockCommitActive)
			} else {
				_, err = e.d.BlockCommit(e.ctx, "vm", "xvda", e.path("vm-xvda.qcow2"), e.path("vm-xvda.a"), 0, 0)
			}
			expectKilledCall(t, err)
			k.wait()
			if tc.point == killAnswered {
				k.before("BLOCK_JOB_COMPLETED")
			}
			e.afterKill()
			e.offChain("xvda", tc.chain...)
			e.offChain("xvdb", "vm-xvdb.b", "vm-xvdb.a", "vm-xvdb.qcow2")
			e.gone(tc.gone...)
			if e.defined() != e.path(tc.chain[0]) {
				t.Fatalf("vm.xml names %s", e.defined())
			}
			for i, p := range tc.readBack {
				e.expect("xvda", p, i*mib)
			}
			storagetest.ExpectImage(t, e.path("vm-xvda.qcow2"), "qcow2", 0x22, mib, mib)
			e.expectBulk()
			e.expect("xvdb", 0x51, 0)
		})
	}
}

// TestFaultDeviceModelKilledMidStream: blockpull's device model is
// SIGKILLed mid-job (slowed; the guest writing meanwhile): the pull is
// undone, the chain stays (a stream only copies what the chain reads);
// and once the job completed (QEMU rewrote the header; nobody flushed
// the copies): the pull is finished from the layers, still on disk.
func TestFaultDeviceModelKilledMidStream(t *testing.T) {
	for _, tc := range []struct {
		name  string
		match []string
		point killPoint
		chain []string
		gone  []string
	}{
		{"mid-job", []string{`"block-stream"`}, killAnswered,
			[]string{"vm-xvda.b", "vm-xvda.a", "vm-xvda.qcow2"}, nil},
		{"completed", []string{"BLOCK_JOB_COMPLETED"}, killAtEvent,
			[]string{"vm-xvda.b"}, []string{"vm-xvda.a"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.seedBulk()
			k := startKiller(e, tc.match, tc.point, tc.point == killAnswered,
				guestWrite("dev0", 0xe5, 0), guestWrite("dev0", 0xe6, 3*mib), guestFlush("dev0"))
			_, err := e.d.BlockPull(e.ctx, "vm", "xvda", 0, 0)
			expectKilledCall(t, err)
			k.wait()
			if tc.point == killAnswered {
				k.before("BLOCK_JOB_COMPLETED")
			}
			e.afterKill()
			e.offChain("xvda", tc.chain...)
			e.gone(tc.gone...)
			if _, err := os.Stat(e.path("vm-xvda.qcow2")); err != nil {
				t.Fatalf("the user's base: %v", err)
			}
			for i, p := range []byte{0xe5, 0x22, 0x33, 0xe6} {
				e.expect("xvda", p, i*mib)
			}
			e.expectBulk()
			e.expect("xvdb", 0x51, 0)
		})
	}
}

// TestFaultDeviceModelKilledMidSnapshot: a live snapshot's device model
// is SIGKILLed before its transaction reaches QEMU (undone: no
// snapshot, no overlay left), and after QEMU carried it out but before
// the driver heard (finished: the overlays are whole qcow2 images over
// their images, and hold what the guest wrote after the switch).
func TestFaultDeviceModelKilledMidSnapshot(t *testing.T) {
	for _, tc := range []struct {
		name  string
		point killPoint
		snaps []string
		chain []string
		data  byte // xvda at 1 MiB
	}{
		{"before", killBefore, nil, []string{"vm-xvda.qcow2"}, 0},
		{"unanswered", killUnanswered, []string{"f1"}, []string{"vm-xvda.f1", "vm-xvda.qcow2"}, 0xe7},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t)
			e.write("xvda", 0x31, 0)
			e.write("xvdb", 0x41, 0)
			var guest []string
			if tc.point != killBefore {
				guest = []string{guestWrite("dev0", 0xe7, mib), guestFlush("dev0")}
			}
			k := startKiller(e, []string{`"transaction"`}, tc.point, false, guest...)
			_, err := e.d.SnapshotCreateXML(e.ctx, "vm", "<domainsnapshot><name>f1</name></domainsnapshot>", driver.CreateDiskOnly)
			expectKilledCall(t, err)
			k.wait()
			if names := e.afterKill(); !slices.Equal(names, tc.snaps) {
				t.Fatalf("after recovery: snapshots %v, want %v", names, tc.snaps)
			}
			e.offChain("xvda", tc.chain...)
			if tc.snaps == nil {
				e.gone("vm-xvda.f1", "vm-xvdb.f1")
			}
			e.expect("xvda", 0x31, 0)
			e.expect("xvda", tc.data, mib)
			e.expect("xvdb", 0x41, 0)
			storagetest.ExpectImage(t, e.path("vm-xvda.qcow2"), "qcow2", 0, mib, mib)
		})
	}
}

package live

// Benchmarks of xlsnap's live paths against the bare QMP each wraps, on a
// real device model (qemutest: TCG, headless, started with -S and no
// guest inside, so what is measured is QEMU's block layer and the QMP
// around it). Sub-benchmarks NAME/native (xlsnap) and NAME/qmp (the bare
// QMP a toolstack would send itself, over xlsnap's own QMP client) run in
// the same process on the same kind of images; scripts/benchtable.sh pairs
// them and prints qmp ÷ native, so a ratio below 1 is xlsnap's overhead.
// The goals: a guest-visible pause and a live merge within 1.2× of the
// bare QMP, i.e. a ratio of at least 0.83.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/storagetest"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qemu"
	"github.com/xlsnap/xlsnap/xenlight/qemutest"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// benchChain is how many snapshots go on one chain before the snapshot
// benchmarks start over, outside the timer, on fresh images and a fresh
// device model: chains stay as short as real ones, and every iteration
// does the same work.
const benchChain = 32

var benchTargets = []string{"xvda", "xvdb", "xvdc", "xvdd"}

// benchDir is a short folder (it holds the QMP sockets) for definitions,
// images and sockets alike, with its symlinks resolved as a pool's path.
func benchDir(b *testing.B) string {
	b.Helper()
	dir, err := filepath.EvalSymlinks(filepath.Dir(qemutest.SocketPath(b, "x")))
	if err != nil {
		b.Fatal(err)
	}
	return dir
}

// benchExpect asserts an image (open in the device model) reads pattern
// over [off, off+length).
func benchExpect(b *testing.B, path string, pattern byte, off, length int) {
	b.Helper()
	out, err := exec.Command("qemu-io", "-r", "-U", "-f", "qcow2", "-c",
		fmt.Sprintf("read -P 0x%02x %d %d", pattern, off, length), path).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") || strings.Contains(string(out), "error") {
		b.Fatalf("%s at %d+%d: want pattern 0x%02x: %v\n%s", path, off, length, pattern, err, out)
	}
}

func benchDial(b *testing.B, sock string) *qmp.Monitor {
	b.Helper()
	m, err := qmp.Dial(context.Background(), "unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	return m
}

// benchDomain is one domain: NAME.xml in the folder, its disks, and its
// device model serving them at NAME.qmp.
type benchDomain struct {
	dir, name, sock string
	qemu            *qemutest.Process
	files           []string // each disk's active layer
	nodes           []string // each disk's top node, as the bare runs name them
}

// startDomain writes NAME.xml for n disks on fresh qcow2 images of 64 MiB
// (copies of template, if set) and starts their device model.
func startDomain(b *testing.B, dir, name string, n int, template string) *benchDomain {
	b.Helper()
	dom := &benchDomain{dir: dir, name: name, sock: filepath.Join(dir, name+".qmp")}
	var disks []qemutest.Disk
	var def strings.Builder
	fmt.Fprintf(&def, "<domain type='xen'><name>%s</name><memory>262144</memory><os><type>linux</type></os><devices>\n", name)
	for _, target := range benchTargets[:n] {
		p := filepath.Join(dir, name+"-"+target+".qcow2")
		if template != "" {
			storagetest.CopyFile(b, template, p)
		} else {
			storagetest.Run(b, "qemu-img", "create", "-q", "-f", "qcow2", p, "64M")
		}
		disks = append(disks, qemutest.Disk{NodeName: target, Path: p, Format: "qcow2"})
		fmt.Fprintf(&def, "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='%s'/></disk>\n", p, target)
		dom.files = append(dom.files, p)
		dom.nodes = append(dom.nodes, target)
	}
	def.WriteString("</devices></domain>")
	if err := os.WriteFile(filepath.Join(dir, name+".xml"), []byte(def.String()), 0o644); err != nil {
		b.Fatal(err)
	}
	os.Remove(dom.sock) // a previous device model's, under the same name
	dom.qemu = qemutest.Start(b, dom.sock, disks)
	return dom
}

// stop kills the device model now (the benchmark's cleanup waits for it)
// and removes the domain's images.
func (dom *benchDomain) stop() {
	dom.qemu.Cmd.Process.Kill()
	images, _ := filepath.Glob(filepath.Join(dom.dir, dom.name+"-*"))
	for _, p := range images {
		os.Remove(p)
	}
}

// expectTops asserts the device model writes every disk's dom.files.
func (dom *benchDomain) expectTops(b *testing.B) {
	b.Helper()
	m := benchDial(b, dom.sock)
	defer m.Disconnect()
	chains, err := xenlight.Chains(context.Background(), m)
	if err != nil {
		b.Fatal(err)
	}
	for i, c := range chains {
		if c.Files[0] != dom.files[i] {
			b.Fatalf("disk %d: the device model writes %v, want %s", i, c.Files, dom.files[i])
		}
	}
}

// bareActions are the transaction's actions a toolstack would send for a
// disk-only snapshot of every disk, the same ones Live.Snapshot builds;
// they name each new overlay file and node after suffix.
func (dom *benchDomain) bareActions(suffix string) (actions []map[string]any, files, nodes []string) {
	for i, node := range dom.nodes {
		file := strings.TrimSuffix(dom.files[i], filepath.Ext(dom.files[i])) + "." + suffix
		next := fmt.Sprintf("%s-%s", benchTargets[i], suffix)
		actions = append(actions, map[string]any{"type": "blockdev-snapshot-sync",
			"data": map[string]any{"node-name": node, "snapshot-file": file,
				"snapshot-node-name": next, "format": "qcow2", "mode": "absolute-paths"}})
		files, nodes = append(files, file), append(nodes, next)
	}
	return actions, files, nodes
}

// tap is a pass-through in front of a device model's QMP socket that
// times every `transaction` command on the wire: from the moment its
// request line is handed to QEMU's socket until QEMU's reply line has been
// read back. Both ends are taken next to QEMU, so neither client's JSON
// encoding, decoding or scheduling is in the figure, and xlsnap and the
// bare client are timed the same way. Inside that span QEMU drains the
// snapshotted disks, creates and opens the overlays and switches to them
// (qmp_transaction: prepare, commit, clean), so it is an upper bound, a
// tight one, of the time the guest's disk I/O is held.
type tap struct {
	sock string
	l    net.Listener
	wg   sync.WaitGroup

	mu       sync.Mutex
	upstream string
	conns    map[net.Conn]bool
	took     time.Duration
	count    int
	// The guest's pauses: QEMU's own timestamps of its STOP and RESUME
	// events (the vCPUs stopped and started again).
	stopped time.Time
	paused  time.Duration
	pauses  int
}

func newTap(b *testing.B, sock string) *tap {
	b.Helper()
	l, err := net.Listen("unix", sock)
	if err != nil {
		b.Fatal(err)
	}
	t := &tap{sock: sock, l: l, conns: map[net.Conn]bool{}}
	t.wg.Add(1)
	go t.serve()
	b.Cleanup(func() {
		l.Close()
		t.mu.Lock()
		for c := range t.conns {
			c.Close()
		}
		t.mu.Unlock()
		t.wg.Wait()
	})
	return t
}

// target points new connections at a device model's socket.
func (t *tap) target(sock string) {
	t.mu.Lock()
	t.upstream = sock
	t.mu.Unlock()
}

// takePauses returns the guest's pauses' total time and count so far,
// and resets them.
func (t *tap) takePauses() (time.Duration, int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	paused, pauses := t.paused, t.pauses
	t.paused, t.pauses = 0, 0
	return paused, pauses
}

// pauseEvent times the guest's pauses from QEMU's STOP and RESUME events.
func (t *tap) pauseEvent(line []byte) {
	var ev struct {
		Event     string `json:"event"`
		Timestamp struct {
			Seconds, Microseconds int64
		} `json:"timestamp"`
	}
	if json.Unmarshal(line, &ev) != nil || ev.Event != "STOP" && ev.Event != "RESUME" {
		return
	}
	at := time.Unix(ev.Timestamp.Seconds, ev.Timestamp.Microseconds*1000)
	t.mu.Lock()
	defer t.mu.Unlock()
	switch {
	case ev.Event == "STOP":
		t.stopped = at
	case !t.stopped.IsZero():
		t.paused += at.Sub(t.stopped)
		t.pauses++
		t.stopped = time.Time{}
	}
}

// take returns the transactions' total time and count so far, and resets
// them.
func (t *tap) take() (time.Duration, int) {
	t.mu.Lock()
	defer t.mu.Unlock()
	took, count := t.took, t.count
	t.took, t.count = 0, 0
	return took, count
}

func (t *tap) serve() {
	defer t.wg.Done()
	for {
		c, err := t.l.Accept()
		if err != nil {
			return
		}
		t.wg.Add(1)
		go t.pipe(c)
	}
}

func (t *tap) track(conns ...net.Conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range conns {
		t.conns[c] = true
	}
}

func (t *tap) untrack(conns ...net.Conn) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range conns {
		c.Close()
		delete(t.conns, c)
	}
}

func (t *tap) pipe(client net.Conn) {
	defer t.wg.Done()
	t.mu.Lock()
	upstream := t.upstream
	t.mu.Unlock()
	dm, err := net.Dial("unix", upstream)
	if err != nil {
		client.Close()
		return
	}
	t.track(client, dm)
	defer t.untrack(client, dm)
	var mu sync.Mutex
	var sent time.Time // when a transaction went to QEMU; zero if none is pending
	t.wg.Add(1)
	go func() { // QEMU → client
		defer t.wg.Done()
		defer client.Close()
		r := bufio.NewReader(dm)
		for {
			line, err := r.ReadBytes('\n')
			now := time.Now()
			if err != nil {
				return
			}
			t.pauseEvent(line)
			mu.Lock()
			if !sent.IsZero() && qmpField(line, "event") == "" {
				// One command is in flight at a time: the first line
				// that is not an event is the transaction's reply.
				t.mu.Lock()
				t.took += now.Sub(sent)
				t.count++
				t.mu.Unlock()
				sent = time.Time{}
			}
			mu.Unlock()
			if _, err := client.Write(line); err != nil {
				return
			}
		}
	}()
	r := bufio.NewReader(client) // client → QEMU
	for {
		line, err := r.ReadBytes('\n')
		if err != nil {
			return
		}
		if qmpField(line, "execute") == "transaction" {
			mu.Lock()
			sent = time.Now()
			mu.Unlock()
		}
		if _, err := dm.Write(line); err != nil {
			return
		}
	}
}

// qmpField is a top-level string field of a QMP message.
func qmpField(line []byte, field string) string {
	var msg map[string]json.RawMessage
	var s string
	if json.Unmarshal(line, &msg) != nil || json.Unmarshal(msg[field], &s) != nil {
		return ""
	}
	return s
}

// BenchmarkLiveSnapshotPause: the guest-visible pause of a live disk-only
// snapshot of 1 and 4 disks, i.e. the `transaction` of blockdev-snapshot-
// sync actions over every disk, timed on the wire by a tap (see tap) in
// front of the device model: ns/op is that transaction's mean time.
//
//   - native: xenlight.Live.Snapshot, the part of a live snapshot where
//     xlsnap changes the device model's disks (storage's journal and
//     metadata before and after leave them undrained). call-ms is the
//     whole Live.Snapshot call as its caller sees it: connect and
//     negotiate, query-block to find each disk's node, the transaction,
//     disconnect; a loose upper bound of the pause. (query-block drains
//     nothing, but QEMU answers it on its main loop, in a time that grows
//     with the disks' chain depth: see BenchmarkLiveSnapshotEndToEnd.)
//   - qmp: the same transaction sent with qmp.Monitor.Execute over a
//     connection held open; call-ms is that Execute call.
//
// Both clients reach QEMU through the tap, so call-ms includes a
// pass-through's hop for every message (Live.Snapshot exchanges four).
func BenchmarkLiveSnapshotPause(b *testing.B) {
	for _, n := range []int{1, 4} {
		b.Run(fmt.Sprintf("disks=%d", n), func(b *testing.B) {
			b.Run("native", func(b *testing.B) { benchPause(b, n, true) })
			b.Run("qmp", func(b *testing.B) { benchPause(b, n, false) })
		})
	}
}

func benchPause(b *testing.B, n int, native bool) {
	ctx := context.Background()
	dir := benchDir(b)
	tp := newTap(b, filepath.Join(dir, "tap.qmp"))
	live := xenlight.NewLive(qemu.New(func(string) string { return tp.sock }), "vm")
	var dom *benchDomain
	var m *qmp.Monitor // qmp: the connection held for a chain
	for i := 0; i < b.N; i++ {
		if i%benchChain == 0 {
			b.StopTimer()
			if m != nil {
				m.Disconnect()
			}
			if dom != nil {
				dom.stop()
			}
			dom = startDomain(b, dir, fmt.Sprintf("vm%d", i/benchChain), n, "")
			tp.target(dom.sock)
			if !native {
				m = benchDial(b, tp.sock)
			}
			b.StartTimer()
		}
		suffix := fmt.Sprintf("s%d", i)
		actions, files, nodes := dom.bareActions(suffix)
		if native {
			var overlays []storage.LiveOverlay
			for k, target := range benchTargets[:n] {
				overlays = append(overlays, storage.LiveOverlay{Disk: target, Image: dom.files[k], ImageFormat: "qcow2",
					Overlay: files[k], Format: "qcow2"})
			}
			if err := live.Snapshot(ctx, overlays); err != nil {
				b.Fatalf("%v\n%s", err, dom.qemu.Stderr())
			}
		} else if err := m.Execute(ctx, "transaction", map[string]any{"actions": actions}, nil); err != nil {
			b.Fatalf("%v\n%s", err, dom.qemu.Stderr())
		}
		dom.files, dom.nodes = files, nodes
	}
	b.StopTimer()
	if m != nil {
		m.Disconnect()
	}
	dom.expectTops(b)
	took, count := tp.take()
	if count != b.N {
		b.Fatalf("the tap saw %d transactions in %d iterations", count, b.N)
	}
	b.ReportMetric(float64(b.Elapsed())/1e6/float64(b.N), "call-ms")
	b.ReportMetric(float64(took)/float64(b.N), "ns/op")
}

// BenchmarkLiveSnapshotEndToEnd: what a toolstack pays for a live
// disk-only snapshot of 1 and 4 disks, no tap in between.
//
//   - native: driver.SnapshotCreateXML(DISK_ONLY|ATOMIC) on a running
//     domain of the folder source: the domain's state from the device
//     model (query-status), the domain record re-read from its chains and
//     rewritten, the journal, storage's check that the step is not done
//     already (a query-block), Live.Snapshot (another query-block, the
//     transaction), the metadata commit, and the definition rewritten to
//     the new overlays (fsynced). Three QMP connections in all.
//   - qmp: the same transaction with nothing around it but a freshly
//     dialled connection: qmp.Dial (greeting, qmp_capabilities),
//     Execute, Disconnect.
func BenchmarkLiveSnapshotEndToEnd(b *testing.B) {
	for _, n := range []int{1, 4} {
		b.Run(fmt.Sprintf("disks=%d", n), func(b *testing.B) {
			b.Run("native", func(b *testing.B) { benchEndToEnd(b, n, true) })
			b.Run("qmp", func(b *testing.B) { benchEndToEnd(b, n, false) })
		})
	}
}

func benchEndToEnd(b *testing.B, n int, native bool) {
	ctx := context.Background()
	dir := benchDir(b)
	var d *driver.Driver
	if native {
		src, err := driver.NewDirSource(dir)
		if err != nil {
			b.Fatal(err)
		}
		h := qemu.New(func(domain string) string { return filepath.Join(dir, domain+".qmp") })
		d, err = driver.Open(ctx, driver.Config{StateDir: b.TempDir(), Source: src, Pools: []string{dir}, Hypervisor: h})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { d.Close() })
	}
	var dom *benchDomain
	for i := 0; i < b.N; i++ {
		if i%benchChain == 0 {
			b.StopTimer()
			if dom != nil {
				dom.stop()
			}
			dom = startDomain(b, dir, fmt.Sprintf("vm%d", i/benchChain), n, "")
			if native {
				// The driver's first sight of a domain records it: not
				// part of a snapshot.
				if _, err := d.DiskList(ctx, dom.name); err != nil {
					b.Fatal(err)
				}
			}
			b.StartTimer()
		}
		suffix := fmt.Sprintf("s%d", i)
		actions, files, nodes := dom.bareActions(suffix)
		if native {
			desc := fmt.Sprintf("<domainsnapshot><name>%s</name></domainsnapshot>", suffix)
			if _, err := d.SnapshotCreateXML(ctx, dom.name, desc, driver.CreateDiskOnly|driver.CreateAtomic); err != nil {
				b.Fatalf("%v\n%s", err, dom.qemu.Stderr())
			}
		} else {
			m, err := qmp.Dial(ctx, "unix", dom.sock)
			if err != nil {
				b.Fatal(err)
			}
			err = m.Execute(ctx, "transaction", map[string]any{"actions": actions}, nil)
			m.Disconnect()
			if err != nil {
				b.Fatalf("%v\n%s", err, dom.qemu.Stderr())
			}
		}
		// The driver names overlays as bareActions does (NAME.SNAPSHOT
		// beside the image), so files holds the new active layers.
		dom.files, dom.nodes = files, nodes
	}
	b.StopTimer()
	dom.expectTops(b)
	if native {
		disks, err := d.DiskList(ctx, dom.name)
		if err != nil {
			b.Fatal(err)
		}
		for k, disk := range disks {
			if disk.Source != dom.files[k] {
				b.Fatalf("%s: recorded active layer %s, want %s", disk.Target, disk.Source, dom.files[k])
			}
		}
	}
}

// BenchmarkLiveMerge: deleting an external snapshot of a running 1-disk
// domain (its guest started: cont) whose child, the active layer, holds
// 16 MiB the guest wrote (its state image 32 MiB, so the child is
// committed down): an active commit inside the device model. Each
// iteration starts, outside the timer, from a fresh copy of the same base
// image, a fresh device model on it, a live snapshot, and the guest's 16
// MiB written into the new overlay through the device model.
//
//   - native: driver.SnapshotDelete: the domain's state (query-status),
//     the domain record re-read and rewritten, the merge plan (allocation
//     of both images, a query-block to see the child in use), the
//     journal, storage's check that the child is still in use (a
//     query-block), Live.Commit (a query-block and the base's node, then
//     block-commit, progress polled every 100 ms, and on BLOCK_JOB_READY
//     the pivot: stop, the job awaited in sync, the base flushed, the
//     pivot's mark written to the journal, job-complete, cont), the
//     metadata commit, removal of the merged overlay and the definition
//     rewritten. Four QMP connections in all, through a tap; pause-µs is
//     the guest's pause, from QEMU's STOP to its RESUME event (QEMU's own
//     timestamps).
//   - qmp: block-commit of the active layer with job-complete on
//     BLOCK_JOB_READY (no pause: the hole the pivot closes), over
//     qmp.Monitor.RunJob on a connection already open; the merged overlay
//     is removed after the timer stops.
func BenchmarkLiveMerge(b *testing.B) {
	template := mergeTemplate(b)
	b.Run("native", func(b *testing.B) { benchMerge(b, template, true, false) })
	b.Run("qmp", func(b *testing.B) { benchMerge(b, template, false, false) })
}

// BenchmarkLivePivotPause: the guest's pause in the pivot of the merge of
// BenchmarkLiveMerge, ns/op being the mean time from QEMU's STOP event to
// its RESUME (QEMU's timestamps, read by a tap).
//
//   - native: driver.SnapshotDelete, as in BenchmarkLiveMerge: inside the
//     pause, query-block-jobs until the job is in sync, the base's flush
//     (HMP qemu-io flush), the journal's write of the mark (bbolt, with
//     its fsync), job-complete, BLOCK_JOB_COMPLETED, cont.
//   - qmp: the least pause a toolstack pivoting a paused guest sends, on
//     a connection already open: stop on BLOCK_JOB_READY, job-complete,
//     BLOCK_JOB_COMPLETED, cont.
func BenchmarkLivePivotPause(b *testing.B) {
	template := mergeTemplate(b)
	b.Run("native", func(b *testing.B) { benchMerge(b, template, true, true) })
	b.Run("qmp", func(b *testing.B) { benchMerge(b, template, false, true) })
}

// mergeTemplate is the domain's base image: 32 MiB of 0x31.
func mergeTemplate(b *testing.B) string {
	template := filepath.Join(b.TempDir(), "template.qcow2")
	storagetest.Run(b, "qemu-img", "create", "-q", "-f", "qcow2", template, "64M")
	storagetest.Run(b, "qemu-io", "-f", "qcow2", "-c", "write -P 0x31 0 32M", template)
	return template
}

// mergeWrite writes the child's 16 MiB into the disk's active layer,
// through the device model.
func mergeWrite(b *testing.B, m *qmp.Monitor, overlay string) {
	chains, err := xenlight.Chains(context.Background(), m)
	if err != nil {
		b.Fatal(err)
	}
	if chains[0].Files[0] != overlay {
		b.Fatalf("the device model writes %v, want %s", chains[0].Files, overlay)
	}
	if err := qemutest.GuestWrite(context.Background(), m, chains[0].Node, 0x32, 32*mib, 16*mib); err != nil {
		b.Fatal(err)
	}
}

// benchMerge is one variant of BenchmarkLiveMerge (pause false) or of
// BenchmarkLivePivotPause (pause true).
func benchMerge(b *testing.B, template string, native, pause bool) {
	ctx := context.Background()
	dir := benchDir(b)
	tp := newTap(b, filepath.Join(dir, "tap.qmp"))
	var d *driver.Driver
	if native {
		src, err := driver.NewDirSource(dir)
		if err != nil {
			b.Fatal(err)
		}
		h := qemu.New(func(string) string { return tp.sock })
		if d, err = driver.Open(ctx, driver.Config{StateDir: b.TempDir(), Source: src, Pools: []string{dir}, Hypervisor: h}); err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { d.Close() })
	}
	overlay := filepath.Join(dir, "vm-xvda.s1")
	var dom *benchDomain
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		if dom != nil {
			dom.stop()
		}
		dom = startDomain(b, dir, "vm", 1, template)
		tp.target(dom.sock)
		m := benchDial(b, dom.sock)
		if err := m.Execute(ctx, "cont", nil, nil); err != nil {
			b.Fatal(err)
		}
		if native {
			m.Disconnect()
			if _, err := d.SnapshotCreateXML(ctx, "vm", "<domainsnapshot><name>s1</name></domainsnapshot>", driver.CreateDiskOnly|driver.CreateAtomic); err != nil {
				b.Fatalf("%v\n%s", err, dom.qemu.Stderr())
			}
			m = benchDial(b, dom.sock)
			mergeWrite(b, m, overlay)
			m.Disconnect()
			b.StartTimer()
			r, err := d.SnapshotDelete(ctx, "vm", "s1", 0)
			b.StopTimer()
			if err != nil {
				b.Fatalf("%v\n%s", err, dom.qemu.Stderr())
			}
			if r.Disks[0].Action != driver.ActionMergedDown {
				b.Fatalf("merge %+v, want an active commit down", r.Disks)
			}
		} else {
			if err := m.Execute(ctx, "blockdev-snapshot-sync", map[string]any{"node-name": "xvda",
				"snapshot-file": overlay, "snapshot-node-name": "top", "format": "qcow2"}, nil); err != nil {
				b.Fatal(err)
			}
			mergeWrite(b, m, overlay)
			m.Disconnect()
			m = benchDial(b, tp.sock)
			b.StartTimer()
			var err error
			if pause {
				err = barePivot(ctx, m)
			} else {
				err = m.RunJob(ctx, qmp.Job{ID: "commit"}, "block-commit", map[string]any{"job-id": "commit", "device": "top"})
			}
			b.StopTimer()
			m.Disconnect()
			if err != nil {
				b.Fatalf("%v\n%s", err, dom.qemu.Stderr())
			}
		}
		if i == 0 {
			dom.expectTops(b)
			benchExpect(b, dom.files[0], 0x31, 0, 32*mib)
			benchExpect(b, dom.files[0], 0x32, 32*mib, 16*mib)
		}
		os.Remove(overlay)
		b.StartTimer()
	}
	b.StopTimer()
	paused, pauses := tp.takePauses()
	if want := map[bool]int{true: b.N, false: 0}[native || pause]; pauses != want {
		b.Fatalf("the guest was paused %d times in %d iterations, want %d", pauses, b.N, want)
	}
	switch {
	case pause:
		b.ReportMetric(float64(paused)/float64(b.N), "ns/op")
	case native:
		b.ReportMetric(float64(paused)/1e3/float64(b.N), "pause-µs")
	}
}

// barePivot is an active commit of node top pivoted with the guest paused
// and nothing else: stop on BLOCK_JOB_READY, job-complete, cont once
// BLOCK_JOB_COMPLETED.
func barePivot(ctx context.Context, m *qmp.Monitor) error {
	events, err := m.Events(ctx)
	if err != nil {
		return err
	}
	if err := m.Execute(ctx, "block-commit", map[string]any{"job-id": "commit", "device": "top"}, nil); err != nil {
		return err
	}
	for ev := range events {
		switch ev.Event {
		case "BLOCK_JOB_READY":
			if err := m.Execute(ctx, "stop", nil, nil); err != nil {
				return err
			}
			if err := m.Execute(ctx, "job-complete", map[string]any{"id": "commit"}, nil); err != nil {
				return err
			}
		case "BLOCK_JOB_COMPLETED":
			return m.Execute(ctx, "cont", nil, nil)
		}
	}
	return qmp.ErrClosed
}

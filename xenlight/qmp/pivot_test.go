package qmp_test

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/xenlight/qemutest"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// status is query-status's running flag and status.
func status(t *testing.T, m *qmp.Monitor) (bool, string) {
	t.Helper()
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := m.Execute(context.Background(), "query-status", nil, &st); err != nil {
		t.Fatal(err)
	}
	return st.Running, st.Status
}

// nodeOf is the format node QEMU opened file as.
func nodeOf(t *testing.T, m *qmp.Monitor, file string) string {
	t.Helper()
	var nodes []struct {
		Node string `json:"node-name"`
		File string `json:"file"`
		Drv  string `json:"drv"`
	}
	if err := m.Execute(context.Background(), "query-named-block-nodes", map[string]any{"flat": true}, &nodes); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if n.File == file && n.Drv == "qcow2" {
			return n.Node
		}
	}
	t.Fatalf("no node for %s: %+v", file, nodes)
	return ""
}

// writes is the file the disk writes now.
func writes(t *testing.T, m *qmp.Monitor) string {
	t.Helper()
	var blocks []struct {
		Inserted struct {
			File string `json:"file"`
		} `json:"inserted"`
	}
	if err := m.Execute(context.Background(), "query-block", nil, &blocks); err != nil || len(blocks) != 1 {
		t.Fatalf("query-block: %+v %v", blocks, err)
	}
	return blocks[0].Inserted.File
}

// jobReady reports whether job id waits ready with nothing left to copy.
func jobReady(t *testing.T, m *qmp.Monitor, id string) bool {
	t.Helper()
	var jobs []struct {
		Device string `json:"device"`
		Len    int64  `json:"len"`
		Offset int64  `json:"offset"`
		Ready  bool   `json:"ready"`
	}
	if err := m.Execute(context.Background(), "query-block-jobs", nil, &jobs); err != nil {
		t.Fatal(err)
	}
	for _, j := range jobs {
		if j.Device == id {
			return j.Ready && j.Offset == j.Len
		}
	}
	return false
}

func expectBase(t *testing.T, base string) {
	t.Helper()
	out, _ := exec.Command("qemu-io", "-r", "-U", "-f", "qcow2", "-c", "read -P 0x5a 0 8M", base).CombinedOutput()
	if strings.Contains(string(out), "verification failed") || !strings.Contains(string(out), "read 8388608/8388608") {
		t.Fatalf("base after the pivot: %s", out)
	}
}

// TestPivot: an active commit completed through the pivot protocol on a
// real QEMU, its guest running (cont) or never started (-S, prelaunch).
// At the mark the guest is not running and the job is ready with nothing
// left to copy; afterwards the disk writes the base and the guest runs
// again only if it ran before; QEMU's STOP and RESUME events frame the
// guest's pause.
func TestPivot(t *testing.T) {
	for _, running := range []bool{true, false} {
		t.Run(map[bool]string{true: "running", false: "prelaunch"}[running], func(t *testing.T) {
			m, p, base, _ := start(t, 8)
			ctx := context.Background()
			if running {
				if err := m.Execute(ctx, "cont", nil, nil); err != nil {
					t.Fatal(err)
				}
			}
			events, err := m.Events(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var marks []bool
			pv := &qmp.Pivot{Target: nodeOf(t, m, base),
				Mark: func(ctx context.Context, paused bool) error {
					marks = append(marks, paused)
					// The monitor is free between the pivot's commands.
					if run, st := status(t, m); run {
						t.Errorf("the guest runs (%s) at the mark", st)
					}
					if !jobReady(t, m, "c0") {
						t.Error("the job is not in sync at the mark")
					}
					return nil
				},
				Unmark: func(context.Context) error { t.Error("Unmark on a pivot that happened"); return nil },
			}
			if err := m.RunJob(ctx, qmp.Job{ID: "c0", Pivot: pv}, "block-commit", map[string]any{"job-id": "c0", "device": "xvda"}); err != nil {
				t.Fatalf("%v\n%s", err, p.Stderr())
			}
			if len(marks) != 1 || marks[0] != running {
				t.Fatalf("marks %v, want one saying paused=%v", marks, running)
			}
			if pv.Resume || !pv.Marked {
				t.Fatalf("pivot left %+v", pv)
			}
			if got := writes(t, m); got != base {
				t.Fatalf("the disk writes %s after the pivot, want %s", got, base)
			}
			if run, st := status(t, m); run != running {
				t.Fatalf("after the pivot the guest is %s, want running=%v", st, running)
			}
			var stop, resume time.Time
			quiet := time.After(time.Second)
		read:
			for {
				select {
				case ev := <-events:
					at := time.Unix(ev.Timestamp.Seconds, ev.Timestamp.Microseconds*1000)
					switch ev.Event {
					case "STOP":
						stop = at
					case "RESUME":
						resume = at
						break read
					}
				case <-quiet:
					break read
				}
			}
			if running {
				if stop.IsZero() || resume.Before(stop) {
					t.Fatalf("STOP at %v, RESUME at %v", stop, resume)
				}
				t.Logf("the guest was paused for %v (QEMU's STOP to RESUME)", resume.Sub(stop))
			} else if !stop.IsZero() || !resume.IsZero() {
				t.Fatal("a guest that was not running was stopped or resumed")
			}
			expectBase(t, base)
		})
	}
}

// TestPivotMarkFails: a mark that cannot be made stops the pivot: the
// guest runs again, the disk still writes the overlay, the job still
// waits ready; adopted later with a working mark, it pivots.
func TestPivotMarkFails(t *testing.T) {
	m, p, base, top := start(t, 8)
	ctx := context.Background()
	if err := m.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	errStore := errors.New("store unavailable")
	unmarked := 0
	pv := &qmp.Pivot{Target: nodeOf(t, m, base),
		Mark:   func(context.Context, bool) error { return errStore },
		Unmark: func(context.Context) error { unmarked++; return nil },
	}
	err := m.RunJob(ctx, qmp.Job{ID: "c0", Pivot: pv}, "block-commit", map[string]any{"job-id": "c0", "device": "xvda"})
	if !errors.Is(err, errStore) {
		t.Fatalf("RunJob with a failing mark: %v\n%s", err, p.Stderr())
	}
	if unmarked != 1 {
		t.Fatalf("a failed mark taken back %d times, want once (it may have landed)", unmarked)
	}
	if run, st := status(t, m); !run || pv.Resume {
		t.Fatalf("after a failed mark the guest is %s (Resume %v), want running", st, pv.Resume)
	}
	if got := writes(t, m); got != top || !jobReady(t, m, "c0") {
		t.Fatalf("after a failed mark the disk writes %s, job ready %v; want %s and the job waiting", got, jobReady(t, m, "c0"), top)
	}
	var marks []bool
	pv.Mark = func(_ context.Context, paused bool) error { marks = append(marks, paused); return nil }
	found, err := m.AdoptJob(ctx, "c", nil, pv)
	if err != nil || !found {
		t.Fatalf("AdoptJob: %v %v", found, err)
	}
	if len(marks) != 1 || !marks[0] || writes(t, m) != base {
		t.Fatalf("adopted: marks %v, disk writes %s", marks, writes(t, m))
	}
	if run, _ := status(t, m); !run {
		t.Fatal("the guest stays paused after the adopted pivot")
	}
	expectBase(t, base)
}

// TestPivotEarlierMark: an earlier call paused the guest, marked the
// pivot and died before job-complete (the job waits ready, the guest
// paused): adopted with its mark (Marked, Resume), the job pivots and the
// guest runs again.
func TestPivotEarlierMark(t *testing.T) {
	m, p, base, _ := start(t, 8)
	ctx := context.Background()
	if err := m.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	events, err := m.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Execute(ctx, "block-commit", map[string]any{"job-id": "c0", "device": "xvda"}, nil); err != nil {
		t.Fatal(err)
	}
	for ev := range events {
		if ev.Event == "BLOCK_JOB_READY" {
			break
		}
	}
	if err := m.Execute(ctx, "stop", nil, nil); err != nil {
		t.Fatal(err)
	}
	var marks []bool
	pv := &qmp.Pivot{Target: nodeOf(t, m, base), Marked: true, Resume: true,
		Mark:   func(_ context.Context, paused bool) error { marks = append(marks, paused); return nil },
		Unmark: func(context.Context) error { t.Error("Unmark on a pivot that happened"); return nil },
	}
	found, err := m.AdoptJob(ctx, "c", nil, pv)
	if err != nil || !found {
		t.Fatalf("AdoptJob: %v %v\n%s", found, err, p.Stderr())
	}
	if len(marks) != 1 || !marks[0] {
		t.Fatalf("marks %v, want the mark kept saying xlsnap paused the guest", marks)
	}
	if run, st := status(t, m); !run || writes(t, m) != base {
		t.Fatalf("after the adopted pivot: guest %s, disk writes %s", st, writes(t, m))
	}
	expectBase(t, base)
}

// injector stands between a client and QEMU's QMP socket and sends QEMU
// one more command of its own right after the first client line holding
// match; the client drops its reply (the id is not the client's).
func injector(t *testing.T, upstream, match, inject string) string {
	t.Helper()
	sock := qemutest.SocketPath(t, "inj")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		q, err := net.Dial("unix", upstream)
		if err != nil {
			return
		}
		defer q.Close()
		go io.Copy(c, q)
		r := bufio.NewReader(c)
		done := false
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				return
			}
			q.Write(line)
			if !done && strings.Contains(string(line), match) {
				done = true
				q.Write([]byte(inject + "\n"))
			}
		}
	}()
	return sock
}

// TestPivotNotInSync: a job that cannot be seen in sync with the guest
// paused (paused by another client right after the pivot's stop: its
// progress vouches for nothing) bounds the pause: the guest runs again
// between tries, and after the last the job is cancelled (ErrNotInSync),
// never marked, the disk still on the overlay and the guest running.
func TestPivotNotInSync(t *testing.T) {
	defer qmp.SetPivotBounds(50*time.Millisecond, 20*time.Millisecond, 2)()
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
	p := qemutest.Start(t, qemutest.SocketPath(t, "qmp"), []qemutest.Disk{{NodeName: "xvda", Path: top, Format: "qcow2"}})
	ctx := context.Background()
	m, err := qmp.Dial(ctx, "unix", injector(t, p.Socket, `"stop"`, `{"execute":"block-job-pause","arguments":{"device":"c0"},"id":"inj"}`))
	if err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	if err := m.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	pv := &qmp.Pivot{Target: nodeOf(t, m, base),
		Mark:   func(context.Context, bool) error { t.Error("marked a job not in sync"); return nil },
		Unmark: func(context.Context) error { t.Error("Unmark with no mark"); return nil },
	}
	t0 := time.Now()
	err = m.RunJob(ctx, qmp.Job{ID: "c0", Pivot: pv}, "block-commit", map[string]any{"job-id": "c0", "device": "xvda"})
	if !errors.Is(err, qmp.ErrNotInSync) {
		t.Fatalf("a job that cannot catch up: %v, want ErrNotInSync\n%s", err, p.Stderr())
	}
	t.Logf("gave up after %v: %v", time.Since(t0), err)
	if run, st := status(t, m); !run || pv.Resume {
		t.Fatalf("after giving up the guest is %s (Resume %v), want running", st, pv.Resume)
	}
	var jobs []any
	if err := m.Execute(ctx, "query-block-jobs", nil, &jobs); err != nil || len(jobs) != 0 {
		t.Fatalf("jobs after giving up: %v %v", jobs, err)
	}
	if got := writes(t, m); got != top {
		t.Fatalf("after giving up the disk writes %s, want %s", got, top)
	}
}

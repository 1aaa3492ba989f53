package qmp_test

import (
	"context"
	"errors"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/xenlight/qemutest"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// start makes base ← top (top holding `mib` MiB of 0x5a), runs QEMU on top
// as node "xvda" and connects.
func start(t *testing.T, mib int) (*qmp.Monitor, *qemutest.Process, string, string) {
	t.Helper()
	dir := t.TempDir()
	base, top := filepath.Join(dir, "base.qcow2"), filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "64M")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, top)
	if mib > 0 {
		run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 "+itoa(mib)+"M", top)
	}
	p := qemutest.Start(t, qemutest.SocketPath(t, "qmp"), []qemutest.Disk{{NodeName: "xvda", Path: top, Format: "qcow2"}})
	m, err := qmp.Dial(context.Background(), "unix", p.Socket)
	if err != nil {
		t.Fatalf("%v\n%s", err, p.Stderr())
	}
	t.Cleanup(func() { m.Disconnect() })
	return m, p, base, top
}

func itoa(n int) string { return strconv.Itoa(n) }

func TestExecuteKeepsErrorClass(t *testing.T) {
	m, _, _, _ := start(t, 0)
	if m.Version == nil || m.Version.QEMU.Major < 7 {
		t.Fatalf("version %+v", m.Version)
	}
	var st struct {
		Running bool   `json:"running"`
		Status  string `json:"status"`
	}
	if err := m.Execute(context.Background(), "query-status", nil, &st); err != nil || st.Status != "prelaunch" {
		t.Fatalf("query-status: %+v, %v", st, err)
	}
	err := m.Execute(context.Background(), "device_del", map[string]any{"id": "nosuch"}, nil)
	var qe *qmp.Error
	if !errors.As(err, &qe) || qe.Class != "DeviceNotFound" || qe.Command != "device_del" || !qmp.IsClass(err, "DeviceNotFound") {
		t.Fatalf("device_del of a missing device: %#v", err)
	}
	// Raw JSON, as for commands go-qemu's generated schema lacks.
	out, err := m.Run([]byte(`{"execute":"query-jobs"}`))
	if err != nil || !strings.Contains(string(out), `"return": []`) {
		t.Fatalf("raw query-jobs: %s, %v", out, err)
	}
}

// TestUndrainedEventsDoNotStall: a subscriber that never reads must not
// block replies (go-qemu's monitor stalls here).
func TestUndrainedEventsDoNotStall(t *testing.T) {
	m, _, _, _ := start(t, 0)
	if _, err := m.Events(context.Background()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for range 50 {
		// cont and stop each emit an event nobody reads.
		if err := m.Execute(ctx, "cont", nil, nil); err != nil {
			t.Fatal(err)
		}
		if err := m.Execute(ctx, "stop", nil, nil); err != nil {
			t.Fatal(err)
		}
	}
	events, err := m.Events(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Execute(ctx, "cont", nil, nil); err != nil {
		t.Fatal(err)
	}
	if ev := <-events; ev.Event != "RESUME" {
		t.Fatalf("event %+v", ev)
	}
}

func TestActiveCommitJob(t *testing.T) {
	m, p, base, top := start(t, 32)
	var mu sync.Mutex
	var seen []int64
	err := m.RunJob(context.Background(), qmp.Job{ID: "commit0", Progress: func(done, total int64) {
		mu.Lock()
		seen = append(seen, done)
		mu.Unlock()
	}}, "block-commit", map[string]any{"job-id": "commit0", "device": "xvda"})
	if err != nil {
		t.Fatalf("%v\n%s", err, p.Stderr())
	}
	if len(seen) == 0 || seen[len(seen)-1] <= 0 {
		t.Fatalf("progress %v", seen)
	}
	// After the pivot the device writes to the base.
	var blocks []struct {
		Inserted struct {
			File string `json:"file"`
		} `json:"inserted"`
	}
	if err := m.Execute(context.Background(), "query-block", nil, &blocks); err != nil {
		t.Fatal(err)
	}
	if len(blocks) != 1 || blocks[0].Inserted.File != base {
		t.Fatalf("device after an active commit of %s: %+v", top, blocks)
	}
	m.Execute(context.Background(), "quit", nil, nil)
	p.Cmd.Process.Wait()
	out, _ := exec.Command("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5a 0 32M", base).CombinedOutput()
	if strings.Contains(string(out), "verification failed") || !strings.Contains(string(out), "read 33554432/33554432") {
		t.Fatalf("base after commit: %s", out)
	}
}

func TestJobCancelledWithContext(t *testing.T) {
	m, p, _, _ := start(t, 16)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() {
		// 1 MiB/s over 16 MiB: still running when cancelled.
		errc <- m.RunJob(ctx, qmp.Job{ID: "slow"}, "block-commit",
			map[string]any{"job-id": "slow", "device": "xvda", "speed": 1 << 20})
	}()
	events, err := m.Events(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for ev := range events {
		if ev.Event == "JOB_STATUS_CHANGE" && ev.Data["status"] == "running" {
			break
		}
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled job: %v\n%s", err, p.Stderr())
	}
	var jobs []any
	if err := m.Execute(context.Background(), "query-jobs", nil, &jobs); err != nil || len(jobs) != 0 {
		t.Fatalf("jobs after cancel: %v %v", jobs, err)
	}
}

func TestDeviceModelKilledMidJob(t *testing.T) {
	m, p, _, _ := start(t, 16)
	errc := make(chan error, 1)
	go func() {
		errc <- m.RunJob(context.Background(), qmp.Job{ID: "slow"}, "block-commit",
			map[string]any{"job-id": "slow", "device": "xvda", "speed": 1 << 20})
	}()
	events, _ := m.Events(context.Background())
	for ev := range events {
		if ev.Event == "JOB_STATUS_CHANGE" && ev.Data["status"] == "running" {
			break
		}
	}
	p.Cmd.Process.Kill()
	if err := <-errc; !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("job on a killed QEMU: %v", err)
	}
	if err := m.Execute(context.Background(), "query-jobs", nil, nil); !errors.Is(err, qmp.ErrClosed) {
		t.Fatalf("command after QEMU died: %v", err)
	}
}

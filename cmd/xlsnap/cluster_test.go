package main

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"

	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore"
	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore/etcdtest"
)

// watcher is an `xlsnap events` process whose lines a test reads.
type watcher struct {
	cmd   *exec.Cmd
	lines chan string
}

// watch starts `xlsnap ARGS events ...` and returns once it waits.
func watch(t *testing.T, args ...string) *watcher {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1")
	stdout, _ := cmd.StdoutPipe()
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	w := &watcher{cmd: cmd, lines: make(chan string, 100)}
	ready := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		var all strings.Builder
		for sc.Scan() {
			all.WriteString(sc.Text() + "\n")
			if sc.Text() == "note: waiting for events" {
				ready <- ""
			}
		}
		ready <- all.String()
	}()
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			w.lines <- sc.Text()
		}
		close(w.lines)
	}()
	select {
	case msg := <-ready:
		if msg != "" {
			t.Fatalf("events ended before waiting: %s", msg)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("events never began to wait")
	}
	return w
}

// next returns the next event line, failing after a while.
func (w *watcher) next(t *testing.T) string {
	t.Helper()
	select {
	case l, ok := <-w.lines:
		if !ok {
			t.Fatal("events ended")
		}
		return l
	case <-time.After(20 * time.Second):
		t.Fatal("no event came")
	}
	return ""
}

// TestEventsAcrossProcesses: `xlsnap events` in one process hears the
// snapshot operations other processes make on the same state folder
// (the embedded store's events file), each exactly once and in order;
// without --loop it ends after the first, saying how many it got.
func TestEventsAcrossProcesses(t *testing.T) {
	c := newCLI(t)
	base := []string{"--connect", "file://" + c.dir, "--state-dir", c.state}
	w := watch(t, append(base, "events", "--json", "--loop", "--timeout", "60")...)
	one := watch(t, append(base, "events", "--domain", "vm")...)
	c.ok("snapshot-create-as", "vm", "s1", "--disk-only")
	c.ok("snapshot-delete", "vm", "s1")
	type ev struct {
		Event, Domain, Disk, Reason, Snapshot, Host string
		Before, After                               []string
	}
	var got []ev
	for range 4 { // two disks, two operations
		var e ev
		if l := w.next(t); json.Unmarshal([]byte(l), &e) != nil {
			t.Fatalf("not JSON: %q", l)
		}
		got = append(got, e)
	}
	host, _ := os.Hostname()
	for i, want := range []struct{ reason, disk string }{{"snapshot", "xvda"}, {"snapshot", "xvdb"}, {"delete", "xvda"}, {"delete", "xvdb"}} {
		e := got[i]
		if e.Event != "chain-changed" || e.Domain != "vm" || e.Reason != want.reason || e.Snapshot != "s1" || e.Host != host {
			t.Errorf("event %d: %+v, want %s of %s", i, e, want.reason, want.disk)
		}
	}
	if got[0].After[0] != c.path("vm-xvda.s1") && got[1].After[0] != c.path("vm-xvda.s1") {
		t.Errorf("snapshot events: %+v", got[:2])
	}
	if l := one.next(t); !strings.HasPrefix(l, "event 'chain-changed' for domain 'vm': xvd") || !strings.Contains(l, "snapshot s1 (snapshot) on host "+host) {
		t.Errorf("first event, as text: %q", l)
	}
	if l := one.next(t); l != "events received: 1" {
		t.Errorf("after one event without --loop: %q", l)
	}
	select {
	case l := <-w.lines:
		t.Errorf("an event too many: %q", l)
	case <-time.After(300 * time.Millisecond):
	}
}

// clusterHost is one host of the CLI cluster test: its own folder of
// domain definitions and its own state folder, the shared pool, one
// etcd cluster.
type clusterHost struct {
	t                *testing.T
	name, dir, state string
	etcd             string
}

func (h *clusterHost) args(args ...string) []string {
	return append([]string{"--connect", "file://" + h.dir, "--state-dir", h.state, "--metadata-store", h.etcd,
		"--metadata-host", h.name, "--metadata-lease", "1"}, args...)
}

func (h *clusterHost) run(env string, args ...string) (string, string, int) {
	h.t.Helper()
	cmd := exec.Command(os.Args[0], h.args(args...)...)
	cmd.Env = append(os.Environ(), "XLSNAP_RUN_MAIN=1", env)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		if !ee.Exited() {
			return out.String(), errb.String(), -1
		}
		return out.String(), errb.String(), ee.ExitCode()
	} else if err != nil {
		h.t.Fatal(err)
	}
	return out.String(), errb.String(), 0
}

func (h *clusterHost) ok(args ...string) string {
	h.t.Helper()
	out, errb, code := h.run("", args...)
	if code != 0 {
		h.t.Fatalf("host %s: xlsnap %v: exit %d\n%s", h.name, args, code, errb)
	}
	return out
}

// define writes domain name's definition with one disk, image.
func (h *clusterHost) define(name, image string) {
	h.t.Helper()
	def := fmt.Sprintf(`<domain type='xen'><name>%s</name><memory>262144</memory><os><type>linux</type></os><devices>
<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='xvda'/></disk>
</devices></domain>`, name, image)
	if err := os.WriteFile(filepath.Join(h.dir, name+".xml"), []byte(def), 0o644); err != nil {
		h.t.Fatal(err)
	}
}

// TestClusterCLI: two hosts (separate folders of definitions and state
// folders) on one shared pool and one three-member etcd cluster.
//   - host B's `events` hears host A's snapshot, naming host A;
//   - host A's domain web is a linked clone, in A's own folder, of a
//     base in the shared pool that B's domain db writes to; B deleting a
//     snapshot of db, whose merge would write into the base, keeps it
//     and says web on host A reads it;
//   - A is killed (SIGKILL) in the middle of a delete's merge; B's
//     check --repair, once A's lease expired, finishes the disk and
//     metadata steps; A's next command rewrites its definition; data
//     and chains as one delete leaves them, check clean on both.
func TestClusterCLI(t *testing.T) {
	c := etcdtest.Start(t, 3)
	etcd := "etcd://" + strings.Join(trimScheme(c.Endpoints), ",") + "/clitest"
	pool := t.TempDir()
	mk := func(name string) *clusterHost {
		dir, err := filepath.EvalSymlinks(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		return &clusterHost{t: t, name: name, dir: dir, state: t.TempDir(), etcd: etcd}
	}
	a, b := mk("hostA"), mk("hostB")
	base := filepath.Join(pool, "base.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", base, "16M")
	qemuIO(t, base, "write -P 0x11 0 1M")
	web := filepath.Join(a.dir, "web.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, web)
	a.define("web", web)
	app := filepath.Join(pool, "app.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", app, "16M")
	qemuIO(t, app, "write -P 0x21 0 4M")
	a.define("app", app)
	b.define("db", base)
	// A's pools: its own folder and the shared pool; B's: the pool.
	aPools := []string{"--pool", a.dir, "--pool", pool}
	a.ok(append(aPools, "domblklist", "web")...)

	w := watch(t, b.args("events", "--loop", "--timeout", "60", "--json")...)
	a.ok(append(aPools, "snapshot-create-as", "app", "s1", "--disk-only")...)
	var ev struct{ Domain, Reason, Snapshot, Host string }
	if l := w.next(t); json.Unmarshal([]byte(l), &ev) != nil || ev.Domain != "app" || ev.Reason != "snapshot" || ev.Host != "hostA" {
		t.Fatalf("host B's event of A's snapshot: %q", l)
	}

	// The shared base.
	b.ok("--pool", pool, "snapshot-create-as", "db", "s1", "--disk-only")
	var rep struct {
		Disks []struct {
			Action string
			Kept   string
			Users  []struct{ Kind, Domain, Host string }
		}
	}
	if err := json.Unmarshal([]byte(b.ok("--pool", pool, "--json", "snapshot-delete", "db", "s1")), &rep); err != nil {
		t.Fatal(err)
	}
	if len(rep.Disks) != 1 || rep.Disks[0].Action != "kept-shared-base" || rep.Disks[0].Kept != base ||
		!strings.Contains(fmt.Sprint(rep.Disks[0].Users), "web hostA") {
		t.Fatalf("B's delete: %+v", rep)
	}
	expectPattern(t, web, 0x11, 0, 1<<20)

	// A dies in the middle of a merge; B finishes it.
	qemuIO(t, filepath.Join(pool, "app.s1"), "write -P 0x22 0 64k")
	if _, errb, code := a.run("XLSNAP_CRASH_AT=delete/step0-commit", append(aPools, "snapshot-delete", "app", "s1")...); code != -1 {
		t.Fatalf("A's delete: exit %d, want death by SIGKILL\n%s", code, errb)
	}
	st, err := etcdstore.Open(context.Background(), etcdstore.Config{Endpoints: c.Endpoints, Prefix: "/clitest/"})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	pending := func() (out []*metastore.Intent) {
		st.View(context.Background(), func(tx metastore.Tx) error {
			all, err := tx.Intents()
			for _, in := range all {
				if !in.Committed {
					out = append(out, in)
				}
			}
			return err
		})
		return out
	}
	if p := pending(); len(p) != 1 || p[0].Owner != "hostA" || !strings.Contains(p[0].Holder, "hostA (etcd lease") {
		t.Fatalf("A's intent after its death: %+v", p)
	}
	deadline := time.Now().Add(30 * time.Second)
	for len(pending()) > 0 {
		if _, errb, code := b.run("", "--pool", pool, "check", "--repair"); code > 2 {
			t.Fatalf("B's check --repair: exit %d\n%s", code, errb)
		}
		if time.Now().After(deadline) {
			t.Fatalf("B never finished A's delete: %+v", pending())
		}
		time.Sleep(300 * time.Millisecond)
	}
	// The data is the delete's: s1's image merged with the overlay.
	expectPattern(t, app, 0x22, 0, 64<<10)
	expectPattern(t, app, 0x21, 64<<10, 4<<20-64<<10)
	// A's next command redoes its definition step.
	if out := a.ok(append(aPools, "domblklist", "app")...); !strings.Contains(out, app) {
		t.Fatalf("A's definition after recovery: %s", out)
	}
	if out := a.ok(append(aPools, "snapshot-list", "app", "--name")...); strings.TrimSpace(out) != "" {
		t.Fatalf("snapshots of app after the delete: %q", out)
	}
	if out := a.ok(append(aPools, "check")...); out != "no problems found\n" {
		t.Fatalf("A's check: %s", out)
	}
	if out := b.ok("--pool", pool, "check"); out != "no problems found\n" {
		t.Fatalf("B's check: %s", out)
	}
}

func trimScheme(eps []string) []string {
	var out []string
	for _, e := range eps {
		out = append(out, strings.TrimPrefix(e, "http://"))
	}
	return out
}

func expectPattern(t *testing.T, path string, p byte, off, n int) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-r", "-U", "-f", "qcow2", "-c", fmt.Sprintf("read -P 0x%02x %d %d", p, off, n), path).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") {
		t.Fatalf("%s at %d+%d: want 0x%02x: %v\n%s", path, off, n, p, err, out)
	}
}

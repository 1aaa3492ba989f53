package storage_test

// Crash tests: a helper process (this test binary, re-executed) runs one
// snapshot, revert or delete and is killed with SIGKILL at every named
// crash point of it (internal/crashpoint, switched by XLSNAP_CRASH_AT).
// Storage is then opened again in the test process, which recovers the
// journal, and the result must be the operation done completely or not at
// all: chains intact, every image sound, no data lost, no orphan left.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

const (
	crashDomain = "vm"
	crashXML    = "<domain type='kvm'><name>vm</name></domain>"
	crashMiB    = 1 << 20
	// crashDiskMiB is the size of each disk storagetest.NewDomain makes.
	crashDiskMiB = 16
	// crashMinPoints guards against the crash-point hook silently
	// breaking: every operation passes at least this many points.
	crashMinPoints = 4

	// The helper process runs when crashEnvOp is set; it acts on the pool
	// and state folders the other variables name.
	crashEnvOp    = "XLSNAP_CRASH_HELPER"
	crashEnvName  = "XLSNAP_CRASH_HELPER_NAME"
	crashEnvModes = "XLSNAP_CRASH_HELPER_MODES"
	crashEnvPool  = "XLSNAP_CRASH_HELPER_POOL"
	crashEnvState = "XLSNAP_CRASH_HELPER_STATE"
	// The crashpoint package's switches.
	crashEnvAt    = "XLSNAP_CRASH_AT"
	crashEnvTrace = "XLSNAP_CRASH_TRACE"
)

var crashDisks = []string{"vda", "vdb"}

// crashPattern is the byte disk i gets for a write of pattern p: each disk
// holds its own data, so a swapped image shows.
func crashPattern(p byte, disk int) byte { return p + byte(disk)*0x40 }

// crashAct is one step of a scenario: a write to both disks, or a storage
// operation on the domain.
type crashAct struct {
	kind    string // write, snapshot, revert, delete, delete-children
	name    string // the snapshot
	modes   []storage.DiskMode
	pattern byte // write: vda's pattern, see crashPattern
	off, n  int  // write: in MiB
}

func crashWrite(p byte, off, n int) crashAct {
	return crashAct{kind: "write", pattern: p, off: off, n: n}
}

func crashSnap(name string, modes ...storage.DiskMode) crashAct {
	return crashAct{kind: "snapshot", name: name, modes: modes}
}

func crashRevert(name string) crashAct { return crashAct{kind: "revert", name: name} }
func crashDelete(name string) crashAct { return crashAct{kind: "delete", name: name} }
func crashDeleteChildren(name string) crashAct {
	return crashAct{kind: "delete-children", name: name}
}

func (a crashAct) String() string {
	if a.kind == "write" {
		return fmt.Sprintf("write 0x%02x at %d MiB +%d MiB", a.pattern, a.off, a.n)
	}
	return a.kind + " " + a.name
}

// do runs a storage operation (every kind but write).
func (a crashAct) do(ctx context.Context, m *storage.Manager) error {
	switch a.kind {
	case "snapshot":
		if len(a.modes) != len(crashDisks) {
			return fmt.Errorf("snapshot %s: %d modes for %d disks", a.name, len(a.modes), len(crashDisks))
		}
		spec := storage.SnapshotSpec{Name: a.name, DomainXML: crashXML}
		for i, d := range crashDisks {
			spec.Disks = append(spec.Disks, storage.SnapshotDiskSpec{Target: d, Mode: a.modes[i]})
		}
		_, err := m.CreateSnapshot(ctx, crashDomain, spec)
		return err
	case "revert":
		_, err := m.Revert(ctx, crashDomain, a.name, storage.RevertOptions{})
		return err
	case "delete":
		_, err := m.DeleteSnapshot(ctx, crashDomain, a.name, storage.DeleteOptions{})
		return err
	case "delete-children":
		_, err := m.DeleteSnapshot(ctx, crashDomain, a.name, storage.DeleteOptions{Children: true})
		return err
	case "snapshot-nometa":
		spec := storage.SnapshotSpec{Name: a.name, NoMetadata: true}
		for i, d := range crashDisks {
			spec.Disks = append(spec.Disks, storage.SnapshotDiskSpec{Target: d, Mode: a.modes[i]})
		}
		_, err := m.CreateSnapshot(ctx, crashDomain, spec)
		return err
	case "coalesce":
		_, err := m.Coalesce(ctx, crashDomain, storage.CoalesceOptions{})
		return err
	}
	return fmt.Errorf("crash helper: unknown operation %q", a.kind)
}

// apply does the act in the test process.
func (a crashAct) apply(e *storagetest.Env) {
	e.T.Helper()
	if a.kind == "write" {
		for i, d := range crashDisks {
			e.Write(crashDomain, d, crashPattern(a.pattern, i), a.off*crashMiB, a.n*crashMiB)
		}
		return
	}
	if a.kind == "delete-uncoalesced" {
		// The delete alone: a helper that dies where the merges of what
		// it freed would begin.
		e.M.Close()
		runCrashHelper(e.T, e, crashDelete(a.name), "coalesce/begin", "")
		e.M = nil
		e.Reopen()
		return
	}
	if err := a.do(e.Ctx, e.M); err != nil {
		e.T.Fatalf("%s: %v", a, err)
	}
}

// crashContent is what a disk shows: the pattern of each MiB.
type crashContent [crashDiskMiB]byte

// crashModel is what every disk and every snapshot must show.
type crashModel struct {
	cur   []crashContent            // by disk, in crashDisks order
	snaps map[string][]crashContent // by snapshot, then disk
}

func (m crashModel) apply(a crashAct) crashModel {
	n := crashModel{cur: slices.Clone(m.cur), snaps: maps.Clone(m.snaps)}
	if n.snaps == nil {
		n.snaps = map[string][]crashContent{}
	}
	if n.cur == nil {
		n.cur = make([]crashContent, len(crashDisks))
	}
	switch a.kind {
	case "write":
		for i := range n.cur {
			for j := a.off; j < a.off+a.n; j++ {
				n.cur[i][j] = crashPattern(a.pattern, i)
			}
		}
	case "snapshot":
		n.snaps[a.name] = slices.Clone(n.cur)
	case "revert":
		n.cur = slices.Clone(n.snaps[a.name])
	case "delete", "delete-uncoalesced":
		delete(n.snaps, a.name)
	case "snapshot-nometa", "coalesce":
		// The data stays where it was.
	default:
		panic("crash model: cannot apply " + a.String())
	}
	return n
}

// crashSubOp is one journaled operation inside the helper's operation (a
// delete with children runs one per snapshot).
type crashSubOp struct {
	// do is the same change as an operation of its own: it builds the
	// state the sub-operation starts from and tells the model its result.
	do crashAct
	// forwardFrom is the first crash point (without the operation's
	// prefix) from which recovery must finish the sub-operation rather
	// than undo it: its point of no return ("intent-written" when its
	// first step already cannot be undone), else "committed".
	forwardFrom string
	// prefix is the sub-operation's journal op name, when it is not the
	// scenario's (a coalesce after a delete).
	prefix string
}

// opPrefix is the journal op name of sub-operation s.
func (sc *crashScenario) opPrefix(s crashSubOp) string {
	if s.prefix != "" {
		return s.prefix
	}
	return sc.prefix
}

// hasPrefix reports whether crash point p is of one of the scenario's
// operations, and whether it is one's beginning.
func (sc *crashScenario) hasPrefix(p string) (ok, begin bool) {
	for _, s := range sc.subOps {
		if pre := sc.opPrefix(s) + "/"; strings.HasPrefix(p, pre) {
			return true, p == pre+"begin"
		}
	}
	return false, false
}

type crashScenario struct {
	name   string
	setup  []crashAct // the starting state, after a domain of 2 fresh disks
	op     crashAct   // what the helper process does
	prefix string     // the crash points' prefix: the journal's op name
	subOps []crashSubOp
	// finalFiles are the pool's files after the operation completes.
	finalFiles []string
}

func crashScenarios() []crashScenario {
	ext := []storage.DiskMode{storage.DiskExternal, storage.DiskExternal}
	in := []storage.DiskMode{storage.DiskInternal, storage.DiskInternal}
	mix := []storage.DiskMode{storage.DiskInternal, storage.DiskExternal}
	files := func(suffixes ...string) []string {
		var out []string
		for _, d := range crashDisks {
			for _, s := range suffixes {
				out = append(out, "vm-"+d+"."+s)
			}
		}
		slices.Sort(out)
		return out
	}
	return []crashScenario{
		{
			name:       "snapshot-external",
			setup:      []crashAct{crashWrite(0x11, 0, 2), crashSnap("s0", ext...), crashWrite(0x12, 1, 2)},
			op:         crashSnap("s1", ext...),
			prefix:     "snapshot",
			subOps:     []crashSubOp{{do: crashSnap("s1", ext...), forwardFrom: "committed"}},
			finalFiles: files("qcow2", "s0", "s1"),
		},
		{
			name:       "snapshot-internal",
			setup:      []crashAct{crashWrite(0x21, 0, 2), crashSnap("i0", in...), crashWrite(0x22, 1, 2)},
			op:         crashSnap("i1", in...),
			prefix:     "snapshot",
			subOps:     []crashSubOp{{do: crashSnap("i1", in...), forwardFrom: "committed"}},
			finalFiles: files("qcow2"),
		},
		{
			// The abandoned active layers (vm-vd?.s2) are removed; s2's state
			// image stays.
			name: "revert-external",
			setup: []crashAct{crashWrite(0x31, 0, 1), crashSnap("s1", ext...), crashWrite(0x32, 1, 1),
				crashSnap("s2", ext...), crashWrite(0x33, 2, 1)},
			op:         crashRevert("s1"),
			prefix:     "revert",
			subOps:     []crashSubOp{{do: crashRevert("s1"), forwardFrom: "committed"}},
			finalFiles: files("qcow2", "s1", "s1-1"),
		},
		{
			// Applying an internal snapshot overwrites the active state: past
			// the first apply recovery must finish the revert.
			name: "revert-internal",
			setup: []crashAct{crashWrite(0x41, 0, 1), crashSnap("i1", in...), crashWrite(0x42, 1, 1),
				crashSnap("i2", in...), crashWrite(0x43, 0, 1)},
			op:         crashRevert("i1"),
			prefix:     "revert",
			subOps:     []crashSubOp{{do: crashRevert("i1"), forwardFrom: "intent-written"}},
			finalFiles: files("qcow2"),
		},
		{
			// The internal snapshot is in an image that now backs an external
			// snapshot's overlay: its content is copied into a new image
			// (undoable) instead of applied.
			name: "revert-internal-copy",
			setup: []crashAct{crashWrite(0x15, 0, 1), crashSnap("i1", in...), crashWrite(0x16, 1, 1),
				crashSnap("e1", ext...), crashWrite(0x17, 2, 1)},
			op:         crashRevert("i1"),
			prefix:     "revert",
			subOps:     []crashSubOp{{do: crashRevert("i1"), forwardFrom: "committed"}},
			finalFiles: files("i1", "qcow2"),
		},
		{
			// vda internal, vdb external: the new overlay (undoable) comes
			// first, then the apply (the point of no return).
			name:       "revert-mixed",
			setup:      []crashAct{crashWrite(0x51, 0, 1), crashSnap("mix", mix...), crashWrite(0x52, 0, 2)},
			op:         crashRevert("mix"),
			prefix:     "revert",
			subOps:     []crashSubOp{{do: crashRevert("mix"), forwardFrom: "step1-internal-apply"}},
			finalFiles: []string{"vm-vda.qcow2", "vm-vdb.mix-1", "vm-vdb.qcow2"},
		},
		{
			// The state image (the base, 1 MiB) holds less than its child
			// (vm-vd?.s1, 4 MiB): it is pulled up into the child, undoably.
			name: "delete-pull-up",
			setup: []crashAct{crashWrite(0x61, 0, 1), crashSnap("s1", ext...), crashWrite(0x62, 1, 4),
				crashSnap("s2", ext...), crashWrite(0x63, 0, 1)},
			op:     crashDelete("s1"),
			prefix: "delete",
			// The pulled-up image ends on the user's name: from the link on,
			// the delete is finished.
			subOps:     []crashSubOp{{do: crashDelete("s1"), forwardFrom: "step2-link"}},
			finalFiles: files("qcow2", "s2"),
		},
		{
			// The state image (the base, 4 MiB) holds more than its child
			// (vm-vd?.s1, 1 MiB): the child is committed down, which cannot
			// be undone.
			name: "delete-commit-down",
			setup: []crashAct{crashWrite(0x71, 0, 4), crashSnap("s1", ext...), crashWrite(0x72, 0, 1),
				crashSnap("s2", ext...), crashWrite(0x73, 2, 1)},
			op:         crashDelete("s1"),
			prefix:     "delete",
			subOps:     []crashSubOp{{do: crashDelete("s1"), forwardFrom: "intent-written"}},
			finalFiles: files("qcow2", "s2"),
		},
		{
			name: "delete-internal",
			setup: []crashAct{crashWrite(0x81, 0, 1), crashSnap("i1", in...), crashWrite(0x82, 1, 1),
				crashSnap("i2", in...), crashWrite(0x83, 2, 1)},
			op:         crashDelete("i1"),
			prefix:     "delete",
			subOps:     []crashSubOp{{do: crashDelete("i1"), forwardFrom: "intent-written"}},
			finalFiles: files("qcow2"),
		},
		{
			// a <- b <- c: deleting b with its children deletes c first (its
			// state image vm-vd?.b holds 2 MiB, the active layer 1 MiB:
			// commit down), then b (vm-vd?.a holds 1 MiB, vm-vd?.b 3 MiB
			// by then: pull up).
			name: "delete-children",
			setup: []crashAct{crashWrite(0x91, 0, 1), crashSnap("a", ext...), crashWrite(0x92, 1, 1),
				crashSnap("b", ext...), crashWrite(0x93, 2, 2), crashSnap("c", ext...), crashWrite(0x94, 4, 1)},
			op:     crashDeleteChildren("b"),
			prefix: "delete",
			subOps: []crashSubOp{
				{do: crashDelete("c"), forwardFrom: "intent-written"},
				{do: crashDelete("b"), forwardFrom: "committed"},
			},
			finalFiles: files("b", "qcow2"),
		},
	}
}

// TestCrashHelperProcess is the helper process TestCrash starts: it opens
// storage on the pool and state folders it is given, runs one operation
// and exits, unless a crash point kills it first.
func TestCrashHelperProcess(t *testing.T) {
	op := os.Getenv(crashEnvOp)
	if op == "" {
		t.Skip("the helper process of TestCrash: runs only when TestCrash starts it with " + crashEnvOp + " set")
	}
	storage.Register("dir", dir.New)
	ctx := context.Background()
	m, err := storage.Open(ctx, storage.Config{
		StateDir: os.Getenv(crashEnvState),
		Pools:    []storage.PoolConfig{{Name: "default", Type: "dir", Path: os.Getenv(crashEnvPool)}},
	})
	if err != nil {
		t.Fatalf("helper: storage.Open: %v", err)
	}
	defer m.Close()
	a := crashAct{kind: op, name: os.Getenv(crashEnvName)}
	if s := os.Getenv(crashEnvModes); s != "" {
		for _, mode := range strings.Split(s, ",") {
			a.modes = append(a.modes, storage.DiskMode(mode))
		}
	}
	if err := a.do(ctx, m); err != nil {
		t.Fatalf("helper: %s: %v", a, err)
	}
}

// runCrashHelper runs a in a helper process on e's folders, tracing the
// crash points it passes to trace. With crashAt empty it must succeed;
// otherwise it must die by SIGKILL.
func runCrashHelper(t *testing.T, e *storagetest.Env, a crashAct, crashAt, trace string) {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^TestCrashHelperProcess$", "-test.count=1", "-test.timeout=2m", "-test.v")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "XLSNAP_CRASH_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	var modes []string
	for _, m := range a.modes {
		modes = append(modes, string(m))
	}
	cmd.Env = append(cmd.Env,
		crashEnvOp+"="+a.kind, crashEnvName+"="+a.name, crashEnvModes+"="+strings.Join(modes, ","),
		crashEnvPool+"="+e.Pool, crashEnvState+"="+e.StateDir, crashEnvTrace+"="+trace)
	if crashAt != "" {
		cmd.Env = append(cmd.Env, crashEnvAt+"="+crashAt)
	}
	// A race-enabled helper that exits normally would sleep a second for
	// late reports; races are reported when they happen all the same.
	cmd.Env = append(cmd.Env, "GORACE="+strings.TrimSpace(os.Getenv("GORACE")+" atexit_sleep_ms=0"))
	out, err := cmd.CombinedOutput()
	if crashAt == "" {
		if err != nil || !strings.Contains(string(out), "--- PASS: TestCrashHelperProcess") {
			t.Fatalf("helper %s without a crash point: %v\n%s", a, err, out)
		}
		return
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		t.Fatalf("helper %s, crash at %s: want death by SIGKILL, got %v\n%s", a, crashAt, err, out)
	}
	ws, ok := ee.Sys().(syscall.WaitStatus)
	if !ok || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
		t.Fatalf("helper %s, crash at %s: want death by SIGKILL, got %v\n%s", a, crashAt, err, out)
	}
}

func readCrashTrace(t *testing.T, path string) []string {
	t.Helper()
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil // no point was hit
	}
	if err != nil {
		t.Fatalf("crash trace: %v", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if line := strings.TrimSpace(sc.Text()); line != "" {
			out = append(out, line)
		}
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// crashRef is what a scenario's crash runs are judged against.
type crashRef struct {
	sc     *crashScenario
	points []string
	// subStart[k] is the index in points of sub-operation k's begin.
	subStart []int
	// want[i] is the stage recovery must reach after a crash at points[i]:
	// how many sub-operations are done.
	want []int
	// models[s] and fps[s] are stage s's data and state.
	models []crashModel
	fps    []string
}

// build makes a fresh starting state in t's temporary folders, with the
// first k sub-operations done (in this process).
func (sc *crashScenario) build(t *testing.T, k int) *storagetest.Env {
	t.Helper()
	e := storagetest.NewEnv(t, "dir")
	e.NewDomain(crashDomain, crashDisks...)
	for _, a := range sc.setup {
		a.apply(e)
	}
	for _, s := range sc.subOps[:k] {
		s.do.apply(e)
	}
	return e
}

func TestCrash(t *testing.T) {
	if os.Getenv(crashEnvAt) != "" || os.Getenv(crashEnvOp) != "" {
		t.Skip("crash switches set in the test process itself")
	}
	for _, tool := range []string{"qemu-img", "qemu-io"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("crash tests need %s: %v", tool, err)
		}
	}
	storage.Register("dir", dir.New)
	for _, sc := range crashScenarios() {
		t.Run(sc.name, func(t *testing.T) {
			t.Parallel()
			testCrashScenario(t, &sc)
		})
	}
}

func testCrashScenario(t *testing.T, sc *crashScenario) {
	n := len(sc.subOps)
	r := &crashRef{sc: sc, models: make([]crashModel, n+1), fps: make([]string, n+1)}
	for _, a := range sc.setup {
		r.models[0] = r.models[0].apply(a)
	}
	for k, s := range sc.subOps {
		r.models[k+1] = r.models[k].apply(s.do)
	}

	// The reference run: the helper without a crash point, tracing the
	// points it passes.
	ref := sc.build(t, 0)
	r.fps[0] = crashFingerprint(t, ref)
	r.checkData(t, ref, 0)
	trace := filepath.Join(t.TempDir(), "trace")
	runCrashHelper(t, ref, sc.op, "", trace)
	r.points = readCrashTrace(t, trace)
	t.Logf("%s (%s): %d crash points: %s", sc.name, sc.op, len(r.points), strings.Join(r.points, " "))
	if len(r.points) < crashMinPoints {
		t.Fatalf("%s passed %d crash points %v, want at least %d: is the crash-point hook still called?",
			sc.op, len(r.points), r.points, crashMinPoints)
	}
	ref.Reopen()
	r.fps[n] = crashFingerprint(t, ref)
	if files := ref.PoolFiles(); !slices.Equal(files, sc.finalFiles) {
		t.Errorf("pool after %s: %v, want %v", sc.op, files, sc.finalFiles)
	}
	// The states between sub-operations, each done on its own.
	for k := 1; k < n; k++ {
		mid := sc.build(t, k)
		r.fps[k] = crashFingerprint(t, mid)
		r.verify(t, mid, nil, k)
	}
	for s := 1; s <= n; s++ {
		if r.fps[s] == r.fps[s-1] {
			t.Fatalf("stage %d is the same as stage %d: the operation changed nothing\n%s", s, s-1, r.fps[s])
		}
	}
	r.plan(t)
	// The run without a crash ends as every run that rolls forward must.
	r.verify(t, ref, nil, n)

	for i, p := range r.points {
		t.Run(fmt.Sprintf("%02d-%s", i, strings.TrimPrefix(p, sc.prefix+"/")), func(t *testing.T) {
			t.Parallel()
			r.crashAt(t, i)
		})
	}
}

// plan splits the trace into sub-operations and works out, for each crash
// point, whether recovery must undo or finish the sub-operation it is in.
func (r *crashRef) plan(t *testing.T) {
	t.Helper()
	sc := r.sc
	for i, p := range r.points {
		ok, begin := sc.hasPrefix(p)
		if !ok {
			t.Fatalf("crash point %q of %s lacks the prefix %s/ (trace %v)", p, sc.op, sc.prefix, r.points)
		}
		if begin {
			r.subStart = append(r.subStart, i)
		}
	}
	if len(r.subStart) != len(sc.subOps) || r.subStart[0] != 0 {
		t.Fatalf("%s: trace %v has %d operations beginning at %v, want %d", sc.op, r.points, len(r.subStart), r.subStart, len(sc.subOps))
	}
	for k, s := range sc.subOps {
		end := len(r.points)
		if k+1 < len(r.subStart) {
			end = r.subStart[k+1]
		}
		seg := r.points[r.subStart[k]:end]
		f := slices.Index(seg, sc.opPrefix(s)+"/"+s.forwardFrom)
		if f < 0 {
			t.Fatalf("%s: sub-operation %s passes no point %s: %v", sc.op, s.do, s.forwardFrom, seg)
		}
		for j := range seg {
			w := k
			if j >= f {
				w = k + 1
			}
			r.want = append(r.want, w)
		}
	}
}

// crashAt builds the starting state afresh, kills the helper at point i,
// recovers and checks the result.
func (r *crashRef) crashAt(t *testing.T, i int) {
	sc := r.sc
	p := r.points[i]
	// A crash point name kills the process the first time it is hit. A
	// point whose name an earlier sub-operation already passed is reached
	// by starting where that sub-operation left off: the helper's
	// operation goes on from there just as it would have.
	k := len(r.subStart) - 1
	for r.subStart[k] > i {
		k--
	}
	from := 0
	if slices.Index(r.points, p) != i {
		from = r.subStart[k]
		if k == 0 || slices.Index(r.points[from:], p) != i-from {
			t.Fatalf("crash point %s (#%d) cannot be reached by name: trace %v", p, i, r.points)
		}
	}
	e := sc.build(t, 0)
	if from > 0 {
		for _, s := range sc.subOps[:k] {
			s.do.apply(e)
		}
	}
	start := map[string]bool{}
	for _, f := range e.PoolFiles() {
		start[f] = true
	}
	trace := filepath.Join(t.TempDir(), "trace")
	runCrashHelper(t, e, sc.op, p, trace)
	if got, want := readCrashTrace(t, trace), r.points[from:i+1]; !slices.Equal(got, want) {
		t.Fatalf("helper passed %v, want %v", got, want)
	}
	e.Reopen() // recovery
	r.verify(t, e, start, r.want[i])
}

// verify checks a recovered state: nothing pending or broken, no orphan,
// the state of stage s exactly, and the data of stage s in every disk
// and every snapshot. It reverts to each snapshot to read it.
func (r *crashRef) verify(t *testing.T, e *storagetest.Env, start map[string]bool, s int) {
	t.Helper()
	ctx := e.Ctx
	problems, err := e.M.Check(ctx)
	if err != nil {
		t.Fatalf("Check: %v", err)
	}
	// A chain that could be shorter is no fault: a crash before a
	// coalesce's point of no return leaves it so, for Coalesce.
	problems = slices.DeleteFunc(problems, func(p storage.Problem) bool { return p.Kind == storage.ProblemCoalescible })
	if len(problems) > 0 {
		t.Errorf("Check after recovery found %+v", problems)
	}
	recorded := map[string]bool{}
	names, err := e.M.Domains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		d, err := e.M.Domain(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		for p, img := range d.Images {
			recorded[filepath.Base(p)] = true
			if filepath.Dir(p) != e.Pool {
				t.Errorf("domain %s: image %s is outside the pool %s", name, p, e.Pool)
			}
			if _, err := os.Stat(p); err != nil {
				t.Errorf("domain %s: recorded image: %v", name, err)
				continue
			}
			if img.Format == "qcow2" {
				if out, err := exec.Command("qemu-img", "check", "-q", "-f", "qcow2", p).CombinedOutput(); err != nil {
					t.Errorf("qemu-img check %s: %v\n%s", p, err, out)
				}
			}
		}
	}
	for _, f := range e.PoolFiles() {
		if !recorded[f] && !(start[f] && slices.Contains(r.sc.finalFiles, f)) {
			t.Errorf("orphan: %s is in the pool and in no image tree (and is not a file that was there before and the operation keeps)", f)
		}
	}
	if got := crashFingerprint(t, e); got != r.fps[s] {
		t.Errorf("recovered to %s, want %s; state differs from the latter (-want +got):\n%s",
			r.stageName(slices.Index(r.fps, got)), r.stageName(s), crashDiff(r.fps[s], got))
	}
	if t.Failed() {
		t.FailNow()
	}
	r.checkData(t, e, s)
	// Every snapshot that exists shows its data.
	m := r.models[s]
	for _, name := range slices.Sorted(maps.Keys(m.snaps)) {
		if _, err := e.M.Revert(ctx, crashDomain, name, storage.RevertOptions{}); err != nil {
			t.Fatalf("revert to %s after recovery: %v", name, err)
		}
		for i, d := range crashDisks {
			p, f := e.Active(crashDomain, d)
			crashExpect(t, p, f, m.snaps[name][i])
		}
	}
}

// stageName tells what stage s is: which sub-operations are done.
func (r *crashRef) stageName(s int) string {
	switch {
	case s < 0:
		return "no state the operation passes through"
	case s == 0:
		return "the state before " + r.sc.op.String()
	case s == len(r.sc.subOps):
		return "the state after " + r.sc.op.String()
	}
	var done []string
	for _, o := range r.sc.subOps[:s] {
		done = append(done, o.do.String())
	}
	return "the state after " + strings.Join(done, ", ")
}

// crashDiff lists the lines only one of two states has.
func crashDiff(want, got string) string {
	wl, gl := strings.Split(want, "\n"), strings.Split(got, "\n")
	var b strings.Builder
	for _, l := range wl {
		if !slices.Contains(gl, l) {
			fmt.Fprintf(&b, "- %s\n", l)
		}
	}
	for _, l := range gl {
		if !slices.Contains(wl, l) {
			fmt.Fprintf(&b, "+ %s\n", l)
		}
	}
	return b.String()
}

// checkData asserts the snapshots of stage s exist and the disks show
// stage s's data.
func (r *crashRef) checkData(t *testing.T, e *storagetest.Env, s int) {
	t.Helper()
	m := r.models[s]
	list, err := e.M.Snapshots(e.Ctx, crashDomain)
	if err != nil {
		t.Fatal(err)
	}
	var have []string
	for _, sn := range list {
		have = append(have, sn.Name)
	}
	slices.Sort(have)
	if want := slices.Sorted(maps.Keys(m.snaps)); !slices.Equal(have, want) {
		t.Fatalf("snapshots %v, want %v", have, want)
	}
	for i, d := range crashDisks {
		p, f := e.Active(crashDomain, d)
		crashExpect(t, p, f, m.cur[i])
	}
}

// crashExpect asserts an image shows c, one read per run of equal MiBs.
func crashExpect(t *testing.T, path, format string, c crashContent) {
	t.Helper()
	for i := 0; i < len(c); {
		j := i
		for j < len(c) && c[j] == c[i] {
			j++
		}
		storagetest.ExpectImage(t, path, format, c[i], i*crashMiB, (j-i)*crashMiB)
		i = j
	}
}

// crashFingerprint describes the whole state, with paths relative to the
// pool so states in different folders compare: the records (domain, image
// tree, snapshots with their XML) and the pool's files with their backing
// references and internal snapshots.
func crashFingerprint(t *testing.T, e *storagetest.Env) string {
	t.Helper()
	ctx := e.Ctx
	rel := func(p string) string {
		if r, ok := strings.CutPrefix(p, e.Pool+"/"); ok {
			return r
		}
		return p
	}
	var b strings.Builder
	names, err := e.M.Domains(ctx)
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(names)
	for _, name := range names {
		d, err := e.M.Domain(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "domain %s current=%q\n", name, d.Current)
		for _, dk := range d.Disks {
			fmt.Fprintf(&b, "  disk %s active=%s (%s)\n", dk.Target, rel(dk.Active), dk.Format)
		}
		for _, p := range slices.Sorted(maps.Keys(d.Images)) {
			img := d.Images[p]
			fmt.Fprintf(&b, "  image %s (%s) backing=%s (%s) owned=%v\n", rel(p), img.Format, rel(img.Backing), img.BackingFormat, img.Owned)
		}
		list, err := e.M.Snapshots(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		slices.SortFunc(list, func(x, y *storage.Snapshot) int { return strings.Compare(x.Name, y.Name) })
		for _, s := range list {
			full, err := e.M.Snapshot(ctx, name, s.Name)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(&b, "  snapshot %s parent=%q state=%s created=%v xml=%q\n", full.Name, full.Parent, full.State, !full.Created.IsZero(), full.DomainXML)
			for _, sd := range full.Disks {
				fmt.Fprintf(&b, "    %s %s image=%s (%s) overlay=%s\n", sd.Target, sd.Mode, rel(sd.Image), sd.Format, rel(sd.Overlay))
			}
		}
	}
	for _, f := range e.PoolFiles() {
		p := filepath.Join(e.Pool, f)
		fmt.Fprintf(&b, "file %s", f)
		if h, err := crashHeader(p); err != nil {
			fmt.Fprintf(&b, " (no qcow2 header: %v)", err)
		} else {
			if h.BackingFile != "" {
				fmt.Fprintf(&b, " backing=%s (%s)", rel(chain.ResolveBacking(p, h.BackingFile)), h.BackingFormat)
			}
			for _, s := range h.Snapshots {
				fmt.Fprintf(&b, " internal=%s", s.Name)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

func crashHeader(path string) (*chain.Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return chain.ParseHeader(f)
}

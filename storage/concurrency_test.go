package storage_test

import (
	"context"
	"errors"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

const concMiB = 1 << 20

// concEnv is a fresh pool and state folder with the dir backend.
func concEnv(t *testing.T) *storagetest.Env {
	t.Helper()
	storage.Register("dir", dir.New)
	return storagetest.NewEnv(t, "dir")
}

// concQemuIO runs one qemu-io command on an image and returns an error on a
// failure or a pattern mismatch; unlike the Env helpers it may run on
// any goroutine.
func concQemuIO(path, format, cmd string, readOnly bool) error {
	args := []string{"-f", format, "-c", cmd, path}
	if readOnly {
		args = append([]string{"-r"}, args...)
	}
	out, err := exec.Command("qemu-io", args...).CombinedOutput()
	if err != nil || strings.Contains(string(out), "Pattern verification failed") || strings.Contains(string(out), "error") {
		return fmt.Errorf("qemu-io %q on %s: %v\n%s", cmd, path, err, out)
	}
	return nil
}

func concActive(ctx context.Context, m *storage.Manager, domain, disk string) (string, string, error) {
	d, err := m.Domain(ctx, domain)
	if err != nil {
		return "", "", err
	}
	dk := d.Disk(disk)
	if dk == nil {
		return "", "", fmt.Errorf("domain %s has no disk %s", domain, disk)
	}
	return dk.Active, dk.Format, nil
}

// concDiskWorker runs rounds of write, snapshot, write, revert and delete of
// the previous round's snapshot on one disk of a domain, through m. Only
// this worker changes that disk's chain, so it checks the data after each
// step even while other workers run on the same domain. Each round's
// snapshot is named DISK-rN; the last one is left.
func concDiskWorker(ctx context.Context, m *storage.Manager, domain, disk string, id, rounds int) error {
	expect := func(pattern byte) error {
		p, f, err := concActive(ctx, m, domain, disk)
		if err != nil {
			return err
		}
		return concQemuIO(p, f, fmt.Sprintf("read -P 0x%02x 0 64k", pattern), true)
	}
	for r := range rounds {
		name := fmt.Sprintf("%s-r%d", disk, r)
		a := byte(id<<4 | r) // this round's snapshot shows a ...
		b := a | 0x08        // ... the overlay that is reverted away b
		p, f, err := concActive(ctx, m, domain, disk)
		if err != nil {
			return err
		}
		if err := concQemuIO(p, f, fmt.Sprintf("write -P 0x%02x 0 64k", a), false); err != nil {
			return err
		}
		s, err := m.CreateSnapshot(ctx, domain, storage.SnapshotSpec{Name: name, DomainXML: "<domain/>",
			Disks: []storage.SnapshotDiskSpec{{Target: disk, Mode: storage.DiskExternal}}})
		if err != nil {
			return fmt.Errorf("create %s: %w", name, err)
		}
		overlay := storage.DefaultOverlayPath(p, name)
		if sd := s.Disk(disk); sd == nil || sd.Image != p || sd.Overlay != overlay {
			return fmt.Errorf("snapshot %s records %+v, want image %s overlay %s", name, s.Disks, p, overlay)
		}
		if p2, _, err := concActive(ctx, m, domain, disk); err != nil || p2 != overlay {
			return fmt.Errorf("after %s the active layer is %s (%v), want %s", name, p2, err, overlay)
		}
		if err := concQemuIO(overlay, "qcow2", fmt.Sprintf("write -P 0x%02x 0 64k", b), false); err != nil {
			return err
		}
		if err := expect(b); err != nil {
			return err
		}
		d, err := m.Revert(ctx, domain, name, storage.RevertOptions{})
		if err != nil {
			return fmt.Errorf("revert %s: %w", name, err)
		}
		if got, want := d.Disk(disk).Active, overlay+"-1"; got != want {
			return fmt.Errorf("revert %s: active %s, want %s", name, got, want)
		}
		if err := expect(a); err != nil {
			return fmt.Errorf("after revert %s: %w", name, err)
		}
		if r > 0 {
			prev := fmt.Sprintf("%s-r%d", disk, r-1)
			rep, err := m.DeleteSnapshot(ctx, domain, prev, storage.DeleteOptions{})
			if err != nil {
				return fmt.Errorf("delete %s: %w", prev, err)
			}
			if len(rep.Disks) != 1 || rep.Disks[0].Disk != disk || rep.Disks[0].Action != storage.ActionPulledUp {
				return fmt.Errorf("delete %s: report %+v", prev, rep.Disks)
			}
			if err := expect(a); err != nil {
				return fmt.Errorf("after delete %s: %w", prev, err)
			}
		}
	}
	return nil
}

// concExpectWorkersDone asserts what concDiskWorker leaves on each disk: the last
// snapshot only, and the chain its revert and the pull-up of the previous
// snapshot leave (vm-DISK.DISK-rLAST-1 on the user's vm-DISK.qcow2: each
// pull-up into an overlay of the user's image ends on the user's name).
func concExpectWorkersDone(t *testing.T, e *storagetest.Env, domain string, disks []string, rounds int) {
	t.Helper()
	var want []string
	for i, disk := range disks {
		last := fmt.Sprintf("%s-r%d", disk, rounds-1)
		want = append(want, last)
		e.ExpectChain(domain, disk,
			fmt.Sprintf("%s-%s.%s-1", domain, disk, last),
			fmt.Sprintf("%s-%s.qcow2", domain, disk))
		e.Expect(domain, disk, byte((i+1)<<4|(rounds-1)), 0, 64<<10)
	}
	concExpectTree(t, e.Ctx, e.M, domain, want)
	e.CheckClean(domain)
}

// concExpectTree asserts the domain's snapshots are exactly want and form a
// tree: every parent exists, no cycle, current is one of them.
func concExpectTree(t *testing.T, ctx context.Context, m *storage.Manager, domain string, want []string) {
	t.Helper()
	list, err := m.Snapshots(ctx, domain)
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]*storage.Snapshot{}
	var got []string
	for _, s := range list {
		byName[s.Name] = s
		got = append(got, s.Name)
	}
	slices.Sort(got)
	want = slices.Sorted(slices.Values(want))
	if !slices.Equal(got, want) {
		t.Fatalf("snapshots of %s: %v, want %v", domain, got, want)
	}
	for _, s := range list {
		seen := 0
		for p := s.Parent; p != ""; p = byName[p].Parent {
			if byName[p] == nil {
				t.Fatalf("snapshot %s: ancestor %q does not exist", s.Name, p)
			}
			if seen++; seen > len(list) {
				t.Fatalf("snapshot %s: cycle in parents", s.Name)
			}
		}
	}
	d, err := m.Domain(ctx, domain)
	if err != nil {
		t.Fatal(err)
	}
	if len(want) > 0 && byName[d.Current] == nil {
		t.Fatalf("current snapshot %q of %s is not one of %v", d.Current, domain, got)
	}
}

func concRun(n int, fn func(i int) error) []error {
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { errs[i] = fn(i) })
	}
	wg.Wait()
	return errs
}

// TestConcurrentOneDomain: many goroutines create, revert and delete
// snapshots of one domain through one Manager at once. Each owns a disk,
// so each can check its data at every step; the Manager serialises them
// and no update of the shared domain record is lost: every disk ends with
// exactly its expected chain, the tree holds exactly one snapshot per
// disk, and Check finds nothing.
func TestConcurrentOneDomain(t *testing.T) {
	t.Parallel()
	e := concEnv(t)
	disks := []string{"vda", "vdb", "vdc", "vdd", "vde", "vdf"}
	const rounds = 3
	e.NewDomain("vm", disks...)
	for i, err := range concRun(len(disks), func(i int) error {
		return concDiskWorker(e.Ctx, e.M, "vm", disks[i], i+1, rounds)
	}) {
		if err != nil {
			t.Errorf("worker %s: %v", disks[i], err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	concExpectWorkersDone(t, e, "vm", disks, rounds)
}

// TestConcurrentDomains: the same workload on several domains at once,
// one goroutine each; each domain ends exactly as it would alone. (That
// domains are not serialised against each other is TestDomainLockHeld,
// which does not depend on timing.)
func TestConcurrentDomains(t *testing.T) {
	t.Parallel()
	e := concEnv(t)
	const n, rounds = 4, 3
	for i := range n {
		e.NewDomain(fmt.Sprintf("d%d", i), "vda")
	}
	for i, err := range concRun(n, func(i int) error {
		return concDiskWorker(e.Ctx, e.M, fmt.Sprintf("d%d", i), "vda", 1, rounds)
	}) {
		if err != nil {
			t.Errorf("domain d%d: %v", i, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	for i := range n {
		concExpectWorkersDone(t, e, fmt.Sprintf("d%d", i), []string{"vda"}, rounds)
	}
}

// concHeldOp is an operation stopped in the middle, holding its domain's lock.
type concHeldOp struct {
	release func()
	done    chan struct{} // closed when the operation returned ...
	err     error         // ... with this
}

// finished reports whether the operation returned.
func (h *concHeldOp) finished() bool {
	select {
	case <-h.done:
		return true
	default:
		return false
	}
}

// concHoldDomain starts, on m, the delete of a snapshot whose merge (a commit
// of 64 KiB into a 1 MiB base) reports progress; the progress callback
// blocks until release, so the delete holds the domain's lock, with its
// intent in the journal, for as long as the test wants.
func concHoldDomain(t *testing.T, e *storagetest.Env, m *storage.Manager, domain string) *concHeldOp {
	t.Helper()
	e.NewDomain(domain, "vda")
	e.Write(domain, "vda", 0xa1, 0, concMiB)
	if _, err := m.CreateSnapshot(e.Ctx, domain, storage.SnapshotSpec{Name: "s1",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatal(err)
	}
	e.Write(domain, "vda", 0xa2, 0, 64<<10)
	entered, unblock := make(chan struct{}), make(chan struct{})
	var once, releaseOnce sync.Once
	h := &concHeldOp{done: make(chan struct{}), release: func() { releaseOnce.Do(func() { close(unblock) }) }}
	ctx := storage.WithProgress(e.Ctx, func(op, disk, image string, pct float64) {
		once.Do(func() {
			close(entered)
			<-unblock
		})
	})
	go func() {
		_, h.err = m.DeleteSnapshot(ctx, domain, "s1", storage.DeleteOptions{})
		close(h.done)
	}()
	t.Cleanup(func() {
		h.release()
		<-h.done
	})
	select {
	case <-entered:
	case <-h.done:
		t.Fatalf("the delete finished without reporting progress: %v", h.err)
	case <-time.After(30 * time.Second):
		t.Fatal("the delete never reported progress")
	}
	return h
}

// concExpectBusy asserts that err, from a wait for a busy domain that the
// context ended, is the context's error and not ErrBusy: a caller that
// retries on busy must not retry a call it cancelled.
func concExpectBusy(t *testing.T, what string, err, cause error) {
	t.Helper()
	if errors.Is(err, storage.ErrBusy) || !errors.Is(err, cause) {
		t.Errorf("%s on a busy domain: %v, want %v and not ErrBusy", what, err, cause)
	}
}

// TestDomainLockHeld stops a delete on domain "a" in the middle of its
// merge, holding a's lock, and shows while it waits:
//   - another domain's operations run to completion: domains are not
//     serialised against each other;
//   - on "a" itself, a call whose context ends while it waits, or that
//     comes with a context already cancelled, fails with the context's
//     error (not ErrBusy) and changes nothing;
//   - Repair (whose journal recovery takes domain locks without waiting)
//     leaves the in-flight intent alone and reports it as pending;
//   - a second Manager on the same state folder, as another process would
//     open it, does not roll the intent back in Open, waits on a's lock
//     file until its deadline (the context's error), and works on other
//     domains;
//
// then that the delete, released, finishes with the right data.
func TestDomainLockHeld(t *testing.T) {
	t.Parallel()
	e := concEnv(t)
	e.NewDomain("b", "vda")
	h := concHoldDomain(t, e, e.M, "a")
	chainA := e.Chain("a", "vda")

	// Another domain, meanwhile.
	if err := concDiskWorker(e.Ctx, e.M, "b", "vda", 0xb, 2); err != nil {
		t.Fatalf("domain b while a is held: %v", err)
	}
	if h.finished() {
		t.Fatalf("a's delete finished while it was held: %v", h.err)
	}

	// The held domain.
	start := time.Now()
	dctx, cancel := context.WithTimeout(e.Ctx, 150*time.Millisecond)
	_, err := e.M.CreateSnapshot(dctx, "a", storage.SnapshotSpec{Name: "x",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}})
	cancel()
	concExpectBusy(t, "CreateSnapshot with a deadline", err, context.DeadlineExceeded)
	if waited := time.Since(start); waited < 150*time.Millisecond {
		t.Errorf("CreateSnapshot gave up after %v, before its deadline", waited)
	}
	cctx, cancel := context.WithCancel(e.Ctx)
	cancel()
	_, err = e.M.CreateSnapshot(cctx, "a", storage.SnapshotSpec{Name: "x"})
	concExpectBusy(t, "CreateSnapshot with a cancelled context", err, context.Canceled)
	_, err = e.M.Revert(cctx, "a", "s1", storage.RevertOptions{})
	concExpectBusy(t, "Revert", err, context.Canceled)
	_, err = e.M.DeleteSnapshot(cctx, "a", "s1", storage.DeleteOptions{})
	concExpectBusy(t, "DeleteSnapshot", err, context.Canceled)
	_, err = e.M.ChainChanged(cctx, "a", "vda", nil)
	concExpectBusy(t, "ChainChanged", err, context.Canceled)
	_, err = e.M.DefineDomain(cctx, "a", "a", "", nil)
	concExpectBusy(t, "DefineDomain", err, context.Canceled)
	if got := e.Chain("a", "vda"); !slices.Equal(got, chainA) {
		t.Errorf("refused calls changed a's chain: %v -> %v", chainA, got)
	}

	expectPendingOnly := func(who string, m *storage.Manager) {
		t.Helper()
		rctx, cancel := context.WithTimeout(e.Ctx, 20*time.Second)
		defer cancel()
		problems, err := m.Repair(rctx)
		if err != nil {
			t.Fatalf("%s: Repair: %v", who, err)
		}
		pending := 0
		for _, p := range problems {
			if p.Fixed || p.Domain == "b" {
				t.Errorf("%s: Repair acted while a's delete runs: %+v", who, p)
			}
			if p.Kind == storage.ProblemPending && p.Domain == "a" {
				pending++
			}
		}
		if pending != 1 {
			t.Errorf("%s: Repair reports %+v, want a's delete pending", who, problems)
		}
	}
	expectPendingOnly("same Manager", e.M)

	// A second Manager, as a second process.
	m2, err := storage.Open(e.Ctx, e.Config)
	if err != nil {
		t.Fatalf("opening a second Manager while a's delete runs: %v", err)
	}
	defer m2.Close()
	dctx, cancel = context.WithTimeout(e.Ctx, 150*time.Millisecond)
	_, err = m2.CreateSnapshot(dctx, "a", storage.SnapshotSpec{Name: "x",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}})
	cancel()
	concExpectBusy(t, "the second Manager's CreateSnapshot", err, context.DeadlineExceeded)
	expectPendingOnly("second Manager", m2)
	if _, err := m2.CreateSnapshot(e.Ctx, "b", storage.SnapshotSpec{Name: "from-m2",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatalf("second Manager on domain b: %v", err)
	}
	if h.finished() {
		t.Fatalf("a's delete finished while it was held: %v", h.err)
	}

	h.release()
	<-h.done
	if h.err != nil {
		t.Fatalf("a's delete, released: %v", h.err)
	}
	e.ExpectChain("a", "vda", "a-vda.qcow2")
	e.Expect("a", "vda", 0xa2, 0, 64<<10)
	e.Expect("a", "vda", 0xa1, 64<<10, concMiB-64<<10)
	concExpectTree(t, e.Ctx, e.M, "a", nil)
	concExpectTree(t, e.Ctx, e.M, "b", []string{"vda-r1", "from-m2"})
	e.ExpectChain("b", "vda", "b-vda.from-m2", "b-vda.vda-r1-1", "b-vda.qcow2")
	e.Expect("b", "vda", 0xb1, 0, 64<<10) // concDiskWorker's last round on b
	e.CheckClean("b")
	e.CheckClean("a")
}

// TestTwoManagersOneDomain: two Managers on one state folder, as two
// processes would have, run the disk workers on the same domain at once,
// half through each. Their in-process locks are separate, so only the
// lock file serialises them; a lost update of the domain record would
// show as a wrong chain, a missing snapshot or a problem in Check.
func TestTwoManagersOneDomain(t *testing.T) {
	t.Parallel()
	e := concEnv(t)
	disks := []string{"vda", "vdb", "vdc", "vdd"}
	const rounds = 3
	e.NewDomain("vm", disks...)
	m2, err := storage.Open(e.Ctx, e.Config)
	if err != nil {
		t.Fatal(err)
	}
	defer m2.Close()
	managers := []*storage.Manager{e.M, m2}
	for i, err := range concRun(len(disks), func(i int) error {
		return concDiskWorker(e.Ctx, managers[i%2], "vm", disks[i], i+1, rounds)
	}) {
		if err != nil {
			t.Errorf("worker %s (Manager %d): %v", disks[i], i%2+1, err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	concExpectWorkersDone(t, e, "vm", disks, rounds)
	// The other Manager sees the same.
	concExpectTree(t, e.Ctx, m2, "vm", []string{"vda-r2", "vdb-r2", "vdc-r2", "vdd-r2"})
	if problems, err := m2.Check(e.Ctx); err != nil || len(problems) > 0 {
		t.Fatalf("Check through the second Manager: %+v, %v", problems, err)
	}
}

// TestSubscribeUnderPublishing: while several goroutines publish chain
// events (rescans of several domains), others subscribe and cancel in a
// loop, reading some events or none. Nothing races, blocks or is lost: a
// subscriber present throughout gets every event, one that never reads
// does not hold up the publishers and still gets them all afterwards,
// every cancelled subscription's channel closes, and Close ends the
// rest.
func TestSubscribeUnderPublishing(t *testing.T) {
	t.Parallel()
	e := concEnv(t)
	const publishers, perPublisher, churners = 4, 25, 4
	for i := range publishers {
		e.NewDomain(fmt.Sprintf("p%d", i), "vda")
	}
	total := publishers * perPublisher
	all, cancelAll := e.M.Subscribe()
	lazy, cancelLazy := e.M.Subscribe() // read only after the publishers end
	kept, _ := e.M.Subscribe()          // never cancelled: Close must end it

	// The reader counts every event until its subscription ends; final
	// is read after readerDone.
	received, readerDone := make(chan struct{}), make(chan struct{})
	var final int
	go func() {
		defer close(readerDone)
		for ev := range all {
			if ev.Reason != "rescan" || ev.Disk != "vda" || !strings.HasPrefix(ev.Domain, "p") {
				t.Errorf("event %+v", ev)
			}
			if final++; final == total {
				close(received)
			}
		}
	}()

	stop := make(chan struct{})
	var churned atomic.Int64
	var churn sync.WaitGroup
	for i := range churners {
		churn.Go(func() {
			for j := 0; ; j++ {
				select {
				case <-stop:
					return
				default:
				}
				ch, cancel := e.M.Subscribe()
				for range (i + j) % 3 { // read 0, 1 or 2 events
					select {
					case <-ch:
					case <-time.After(20 * time.Millisecond):
					}
				}
				cancel()
				cancel() // twice is harmless
				deadline := time.After(10 * time.Second)
			drain:
				for {
					select {
					case _, ok := <-ch:
						if !ok {
							break drain
						}
					case <-deadline:
						t.Error("a cancelled subscription's channel did not close")
						return
					}
				}
				churned.Add(1)
			}
		})
	}

	errs := concRun(publishers, func(i int) error {
		for range perPublisher {
			if _, err := e.M.ChainChanged(e.Ctx, fmt.Sprintf("p%d", i), "vda", nil); err != nil {
				return err
			}
		}
		return nil
	})
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	select {
	case <-received:
	case <-time.After(20 * time.Second):
		t.Fatalf("the subscriber present throughout did not get all %d events", total)
	}
	close(stop)
	churn.Wait()
	if churned.Load() == 0 {
		t.Fatal("no subscription churned")
	}
	t.Logf("%d subscriptions opened and cancelled during %d events", churned.Load(), total)

	for n := range total {
		select {
		case <-lazy:
		case <-time.After(10 * time.Second):
			t.Fatalf("the lazy subscriber got %d events, want %d", n, total)
		}
	}
	select {
	case ev := <-lazy:
		t.Fatalf("an event more than published: %+v", ev)
	case <-time.After(50 * time.Millisecond):
	}
	cancelLazy()
	cancelAll()
	<-readerDone
	if final != total {
		t.Fatalf("the subscriber present throughout got %d events, want %d", final, total)
	}

	// Close ends the subscription nobody cancelled.
	if err := e.M.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case _, ok := <-kept:
		for ok {
			_, ok = <-kept
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not end a live subscription")
	}
	ch, cancel := e.M.Subscribe()
	if ch == nil {
		t.Fatal("Subscribe after Close returned no channel")
	}
	if _, ok := <-ch; ok {
		t.Fatal("a subscription after Close is open")
	}
	cancel()
}

// TestCancelAfterClose: ending a subscription after its Manager was
// closed (a deferred cancel that runs after an explicit Close) must be
// harmless.
func TestCancelAfterClose(t *testing.T) {
	t.Parallel()
	e := concEnv(t)
	_, cancel := e.M.Subscribe()
	if err := e.M.Close(); err != nil {
		t.Fatal(err)
	}
	cancel() // panicked before: both Close and cancel closed the channel
}

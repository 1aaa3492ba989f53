package storage_test

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
	"github.com/xlsnap/xlsnap/storage/backend/dir"
	"github.com/xlsnap/xlsnap/storage/metastore"
	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore"
	"github.com/xlsnap/xlsnap/storage/metastore/etcdstore/etcdtest"
	"github.com/xlsnap/xlsnap/storage/storagetest"
)

// The cluster tests run "hosts": Managers each with its own state
// folder and its own etcd client, on one pool folder and one real
// three-member etcd cluster on loopback.

var clusterPrefix atomic.Int64

// clusterHost opens a Manager as host name on pool (plus extra pools),
// with its own state folder, on the cluster under prefix.
func clusterHost(t *testing.T, c *etcdtest.Cluster, prefix, name, pool string, defs storage.Definitions, extra ...string) *storagetest.Env {
	t.Helper()
	storage.Register("dir", dir.New)
	e := &storagetest.Env{T: t, Ctx: context.Background(), Pool: pool, StateDir: t.TempDir()}
	pools := []storage.PoolConfig{{Name: "shared", Type: "dir", Path: pool}}
	for i, p := range extra {
		pools = append(pools, storage.PoolConfig{Name: fmt.Sprint("own", i), Type: "dir", Path: p})
	}
	st := clusterStore(t, c, prefix, name)
	e.Config = storage.Config{StateDir: e.StateDir, Pools: pools, Store: st, Host: name, Definitions: defs,
		AdoptAfter: 300 * time.Millisecond}
	if defs != nil {
		e.Config.Source = "file:///" + name
	}
	m, err := storage.Open(e.Ctx, e.Config)
	if err != nil {
		t.Fatalf("host %s: %v", name, err)
	}
	e.M = m
	t.Cleanup(func() { m.Close() })
	return e
}

func clusterStore(t *testing.T, c *etcdtest.Cluster, prefix, host string) *etcdstore.Store {
	t.Helper()
	st, err := etcdstore.Open(context.Background(), etcdstore.Config{Endpoints: c.Endpoints, Prefix: prefix, Host: host,
		LockTTL: time.Second, RequestTimeout: 3 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	return st
}

func newPrefix() string { return fmt.Sprintf("/storage%d/", clusterPrefix.Add(1)) }

func sharedPool(t *testing.T) string {
	t.Helper()
	p, err := filepath.EvalSymlinks(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	io.Copy(h, f)
	return fmt.Sprintf("%x", h.Sum(nil))
}

// linkedClone makes an overlay of base at name in the pool.
func linkedClone(t *testing.T, e *storagetest.Env, base, name string) string {
	p := e.Path(name)
	e.Run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, p)
	return p
}

// TestClusterRace: two hosts run the disk workers (write, snapshot,
// write, revert, delete of the previous snapshot, each step's data read
// back) at once on two domains whose four disks are linked clones of one
// base: each domain gets workers from both hosts, so only the cluster's
// domain lock serialises them. No update is lost (each worker checks
// the record after each step), every chain ends as expected on the
// untouched base, both hosts see the same tree, and Check finds nothing.
func TestClusterRace(t *testing.T) {
	c := etcdtest.Start(t, 3)
	pool, prefix := sharedPool(t), newPrefix()
	h1 := clusterHost(t, c, prefix, "h1", pool, nil)
	h2 := clusterHost(t, c, prefix, "h2", pool, nil)
	base := h1.Path("base.qcow2")
	h1.Run("qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	h1.Run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5b 1M 1M", base)
	baseSum := fileSum(t, base)
	for _, d := range []string{"a", "b"} {
		var specs []storage.DiskSpec
		for _, disk := range []string{"vda", "vdb"} {
			specs = append(specs, storage.DiskSpec{Target: disk, Path: linkedClone(t, h1, base, d+"-"+disk+".qcow2"), Format: "qcow2"})
		}
		if _, err := h1.M.DefineDomain(h1.Ctx, d, d, "", specs); err != nil {
			t.Fatal(err)
		}
	}
	type work struct {
		m            *storage.Manager
		domain, disk string
	}
	works := []work{{h1.M, "a", "vda"}, {h2.M, "a", "vdb"}, {h2.M, "b", "vda"}, {h1.M, "b", "vdb"}}
	const rounds = 2
	for i, err := range concRun(len(works), func(i int) error {
		w := works[i]
		return concDiskWorker(h1.Ctx, w.m, w.domain, w.disk, i+1, rounds)
	}) {
		if err != nil {
			t.Errorf("worker %d (%+v): %v", i, works[i], err)
		}
	}
	if t.Failed() {
		t.FailNow()
	}
	for i, w := range works {
		for _, h := range []*storagetest.Env{h1, h2} {
			h.ExpectChain(w.domain, w.disk, fmt.Sprintf("%s-%s.%s-r%d-1", w.domain, w.disk, w.disk, rounds-1),
				fmt.Sprintf("%s-%s.qcow2", w.domain, w.disk), "base.qcow2")
			h.Expect(w.domain, w.disk, byte((i+1)<<4|(rounds-1)), 0, 64<<10)
			h.Expect(w.domain, w.disk, 0x5b, 1<<20, 1<<20)
		}
	}
	for _, d := range []string{"a", "b"} {
		concExpectTree(t, h1.Ctx, h2.M, d, []string{"vda-r1", "vdb-r1"})
		h1.CheckClean(d)
		h2.CheckClean(d)
	}
	if got := fileSum(t, base); got != baseSum {
		t.Error("the shared base changed")
	}
}

// TestClusterLockAcrossHosts: while one host holds a domain's lock for a
// call, the other's operations on it wait and end with their context
// (not ErrBusy), change nothing, and its Recover leaves the domain
// alone; other domains go on.
func TestClusterLockAcrossHosts(t *testing.T) {
	c := etcdtest.Start(t, 3)
	pool, prefix := sharedPool(t), newPrefix()
	h1 := clusterHost(t, c, prefix, "h1", pool, nil)
	h2 := clusterHost(t, c, prefix, "h2", pool, nil)
	h1.NewDomain("a", "vda")
	h1.NewDomain("b", "vda")
	ctx, unlock, err := h1.M.Lock(h1.Ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	// The holder's own calls, with the context, take it no second time.
	if _, err := h1.M.CreateSnapshot(ctx, "a", storage.SnapshotSpec{Name: "s1",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatal(err)
	}
	before := h2.Chain("a", "vda")
	dctx, cancel := context.WithTimeout(h2.Ctx, 200*time.Millisecond)
	_, err = h2.M.CreateSnapshot(dctx, "a", storage.SnapshotSpec{Name: "x",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}})
	cancel()
	concExpectBusy(t, "the other host's create", err, context.DeadlineExceeded)
	if got := h2.Chain("a", "vda"); !slices.Equal(got, before) {
		t.Errorf("the refused create changed the chain: %v -> %v", before, got)
	}
	if _, err := h2.M.CreateSnapshot(h2.Ctx, "b", storage.SnapshotSpec{Name: "y",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatalf("another domain meanwhile: %v", err)
	}
	unlock()
	if _, err := h2.M.CreateSnapshot(h2.Ctx, "a", storage.SnapshotSpec{Name: "x",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatalf("after release: %v", err)
	}
	h1.ExpectChain("a", "vda", "a-vda.x", "a-vda.s1", "a-vda.qcow2")
}

// TestClusterSharedBaseAcrossHosts: host A's domain web is a linked
// clone, in A's own folder, of a base in the shared pool; host B never
// sees that folder, and xlsnap never touched web (no record). A's Open
// publishes what its definitions use, so B, deleting a snapshot of its
// own domain whose merge would write into the base, keeps it
// (kept-shared-base, naming A's domain) and web's data stays.
func TestClusterSharedBaseAcrossHosts(t *testing.T) {
	c := etcdtest.Start(t, 3)
	pool, prefix := sharedPool(t), newPrefix()
	own := sharedPool(t)
	base := filepath.Join(pool, "base.qcow2")
	storagetest.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "16M")
	storagetest.Run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x3c 0 1M", base)
	web := filepath.Join(own, "web.qcow2")
	storagetest.Run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, web)
	clusterHost(t, c, prefix, "hA", pool, fakeDefs{{Domain: "web-key", DomainName: "web", Target: "xvda", Path: web, Format: "qcow2"}}, own)
	hB := clusterHost(t, c, prefix, "hB", pool, fakeDefs{})
	// B's domain writes to the base itself; a snapshot puts an overlay
	// on it, and deleting that snapshot would merge into the base.
	if _, err := hB.M.DefineDomain(hB.Ctx, "vm", "vm", "", []storage.DiskSpec{{Target: "vda", Path: base, Format: "qcow2"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := hB.M.CreateSnapshot(hB.Ctx, "vm", storage.SnapshotSpec{Name: "s1",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatal(err)
	}
	hB.Write("vm", "vda", 0x77, 0, 64<<10)
	baseSum := fileSum(t, base)
	rep, err := hB.M.DeleteSnapshot(hB.Ctx, "vm", "s1", storage.DeleteOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Disks) != 1 || rep.Disks[0].Action != storage.ActionSharedBase || rep.Disks[0].Kept != base ||
		!strings.Contains(storage.DescribeUsers(rep.Disks[0].Users), "disk xvda of domain web on host hA") {
		t.Fatalf("delete report %+v", rep.Disks)
	}
	if got := fileSum(t, base); got != baseSum {
		t.Fatal("the base another host's domain reads changed")
	}
	storagetest.ExpectImage(t, web, "qcow2", 0x3c, 0, 1<<20)
	hB.Expect("vm", "vda", 0x77, 0, 64<<10)
	// B lists A's domain among the base's users.
	us, err := hB.M.Users(hB.Ctx, base)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(storage.DescribeUsers(us), "domain web on host hA") {
		t.Errorf("users of the base: %s", storage.DescribeUsers(us))
	}
}

// fakeDefs is a domain source's definitions as a fixed list (the
// driver's come from a folder or libvirt; the cluster tests need only
// the list).
type fakeDefs []storage.DefinedDisk

func (f fakeDefs) DefinedDisks(context.Context) ([]storage.DefinedDisk, error) { return f, nil }
func (f fakeDefs) Redefine(context.Context, string, string, string, []storage.Disk) error {
	return nil
}

// TestClusterFenced: a host whose lock is lost in the middle of a delete
// (its lease revoked, as an expiry does it) stops with ErrLockLost
// before its next step, writes nothing more, and leaves its intent; the
// other host, once it gets the lock, finishes the delete: data, chain
// and records as one delete leaves them, done once.
func TestClusterFenced(t *testing.T) {
	c := etcdtest.Start(t, 3)
	pool, prefix := sharedPool(t), newPrefix()
	h1 := clusterHost(t, c, prefix, "h1", pool, nil)
	h2 := clusterHost(t, c, prefix, "h2", pool, nil)
	h := concHoldDomain(t, h1, h1.M, "a")
	st := h1.Config.Store.(*etcdstore.Store)
	resp, err := st.Client().Get(h1.Ctx, prefix+"locks/a/", clientv3.WithPrefix())
	if err != nil || len(resp.Kvs) != 1 {
		t.Fatalf("lock keys: %v %v", resp, err)
	}
	if _, err := st.Client().Revoke(h1.Ctx, clientv3.LeaseID(resp.Kvs[0].Lease)); err != nil {
		t.Fatal(err)
	}
	// h1 sees its lease gone (its next keepalive) and cancels its step.
	h.release()
	select {
	case <-h.done:
	case <-time.After(20 * time.Second):
		t.Fatal("the fenced delete never returned")
	}
	if !errors.Is(h.err, metastore.ErrLockLost) {
		t.Fatalf("the fenced delete: %v, want ErrLockLost", h.err)
	}
	// h2 finishes it.
	if err := h2.M.Recover(h2.Ctx); err != nil {
		t.Fatal(err)
	}
	concExpectTree(t, h2.Ctx, h2.M, "a", nil)
	h2.ExpectChain("a", "vda", "a-vda.qcow2")
	h2.Expect("a", "vda", 0xa2, 0, 64<<10)
	h2.Expect("a", "vda", 0xa1, 64<<10, concMiB-64<<10)
	h2.CheckClean("a")
	h1.CheckClean("a")
}

// TestClusterHostKilled: host A, a process of its own, is killed
// (SIGKILL, its qemu-img with it) in the middle of a delete's merge. Its
// intent stays in etcd, with A as owner and its lease as holder. Host B
// leaves it alone while A's lease lives, then finishes it once the lease
// expired: the data, the chain and the records as one delete leaves
// them, nothing done twice, Check clean.
func TestClusterHostKilled(t *testing.T) {
	c := etcdtest.Start(t, 3)
	pool, prefix := sharedPool(t), newPrefix()
	hB := clusterHost(t, c, prefix, "hB", pool, nil)
	hB.NewDomain("a", "vda")
	hB.Write("a", "vda", 0xa1, 0, 4*concMiB)
	if _, err := hB.M.CreateSnapshot(hB.Ctx, "a", storage.SnapshotSpec{Name: "s1",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatal(err)
	}
	hB.Write("a", "vda", 0xa2, 0, 64<<10)
	trace := filepath.Join(t.TempDir(), "trace")
	cmd := exec.Command(os.Args[0], "-test.run=^TestClusterHelperHost$", "-test.v")
	cmd.Env = append(os.Environ(), "XLSNAP_HELPER_HOST=hA", "XLSNAP_HELPER_ETCD="+strings.Join(c.Endpoints, ","),
		"XLSNAP_HELPER_PREFIX="+prefix, "XLSNAP_HELPER_POOL="+pool, "XLSNAP_CRASH_TRACE="+trace)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	out := &strings.Builder{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Wait for the merge to start, then kill A and its qemu-img.
	deadline := time.Now().Add(30 * time.Second)
	for {
		data, _ := os.ReadFile(trace)
		if strings.Contains(string(data), "delete/step0-") {
			break
		}
		if time.Now().After(deadline) {
			cmd.Process.Kill()
			t.Fatalf("host A never reached its merge: %s\n%s", data, out)
		}
		time.Sleep(2 * time.Millisecond)
	}
	time.Sleep(5 * time.Millisecond)
	syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	cmd.Wait()
	var pending []*metastore.Intent
	hB.Config.Store.View(hB.Ctx, func(tx metastore.Tx) error {
		pending, _ = tx.Intents()
		return nil
	})
	if len(pending) != 1 || pending[0].Owner != "hA" || !strings.Contains(pending[0].Holder, "hA (etcd lease") || pending[0].Op != "delete" {
		t.Fatalf("intents after A died: %+v\n%s", pending, out)
	}
	// A's lease still lives a moment: B leaves the intent alone.
	if err := hB.M.Recover(hB.Ctx); err != nil {
		t.Fatal(err)
	}
	// Then, the lease expired, B finishes it.
	deadline = time.Now().Add(20 * time.Second)
	for {
		if err := hB.M.Recover(hB.Ctx); err != nil {
			t.Fatal(err)
		}
		var left []*metastore.Intent
		hB.Config.Store.View(hB.Ctx, func(tx metastore.Tx) error {
			left, _ = tx.Intents()
			return nil
		})
		if len(left) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("B never finished A's delete: %+v", left)
		}
		time.Sleep(200 * time.Millisecond)
	}
	concExpectTree(t, hB.Ctx, hB.M, "a", nil)
	hB.ExpectChain("a", "vda", "a-vda.qcow2")
	hB.Expect("a", "vda", 0xa2, 0, 64<<10)
	hB.Expect("a", "vda", 0xa1, 64<<10, 4*concMiB-64<<10)
	hB.CheckClean("a")
	if files := hB.PoolFiles(); !slices.Equal(files, []string{"a-vda.qcow2"}) {
		t.Errorf("pool after recovery: %v", files)
	}
}

// TestClusterHelperHost is host A of TestClusterHostKilled, run as a
// process of its own: it deletes snapshot s1 of domain a.
func TestClusterHelperHost(t *testing.T) {
	host := os.Getenv("XLSNAP_HELPER_HOST")
	if host == "" {
		t.Skip("the helper host of TestClusterHostKilled")
	}
	storage.Register("dir", dir.New)
	ctx := context.Background()
	st, err := etcdstore.Open(ctx, etcdstore.Config{Endpoints: strings.Split(os.Getenv("XLSNAP_HELPER_ETCD"), ","),
		Prefix: os.Getenv("XLSNAP_HELPER_PREFIX"), Host: host, LockTTL: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	m, err := storage.Open(ctx, storage.Config{StateDir: t.TempDir(), Store: st, Host: host,
		Pools: []storage.PoolConfig{{Name: "shared", Type: "dir", Path: os.Getenv("XLSNAP_HELPER_POOL")}}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = m.DeleteSnapshot(ctx, "a", "s1", storage.DeleteOptions{})
	t.Fatalf("the delete returned (%v) before the test killed this host", err)
}

// TestClusterMemberKilled: one member of three is killed while a host
// runs the disk workers; the cluster keeps quorum, so every operation
// completes (its client fails over) or fails typed (ErrUnavailable),
// and the disks and records end as the operations that completed leave
// them. The member then comes back.
func TestClusterMemberKilled(t *testing.T) {
	c := etcdtest.Start(t, 3)
	pool, prefix := sharedPool(t), newPrefix()
	h1 := clusterHost(t, c, prefix, "h1", pool, nil)
	h1.NewDomain("vm", "vda", "vdb")
	done := make(chan struct{})
	go func() {
		defer close(done)
		time.Sleep(150 * time.Millisecond)
		c.Kill(0)
	}()
	for i, err := range concRun(2, func(i int) error {
		return concDiskWorker(h1.Ctx, h1.M, "vm", []string{"vda", "vdb"}[i], i+1, 3)
	}) {
		if err != nil && !errors.Is(err, metastore.ErrUnavailable) {
			t.Errorf("worker %d with a member killed: %v, want success or ErrUnavailable", i, err)
		}
		if err != nil {
			t.Logf("worker %d: %v", i, err)
		}
	}
	<-done
	c.Restart()
	if err := h1.M.Recover(h1.Ctx); err != nil {
		t.Fatal(err)
	}
	h1.CheckClean("vm")
}

// TestClusterUnreachable: with no member answering, an operation fails
// typed (ErrUnavailable, libvirt's 9) within the request timeout, before
// any disk is touched (its intent could not be written); once the
// cluster is back, the same operation succeeds and Check is clean.
func TestClusterUnreachable(t *testing.T) {
	c := etcdtest.Start(t, 3)
	pool, prefix := sharedPool(t), newPrefix()
	h1 := clusterHost(t, c, prefix, "h1", pool, nil)
	h1.NewDomain("vm", "vda")
	files := h1.PoolFiles()
	c.Stop()
	start := time.Now()
	_, err := h1.M.CreateSnapshot(h1.Ctx, "vm", storage.SnapshotSpec{Name: "s1",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}})
	if !errors.Is(err, metastore.ErrUnavailable) || errdefs.CodeOf(err) != errdefs.CodeOperationFailed {
		t.Fatalf("a create with no member: %v (code %d), want ErrUnavailable", err, errdefs.CodeOf(err))
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("the create took %v to fail", d)
	}
	if got := h1.PoolFiles(); !slices.Equal(got, files) {
		t.Fatalf("a failed create changed the pool: %v -> %v", files, got)
	}
	c.Restart()
	if _, err := h1.M.CreateSnapshot(h1.Ctx, "vm", storage.SnapshotSpec{Name: "s1",
		Disks: []storage.SnapshotDiskSpec{{Target: "vda", Mode: storage.DiskExternal}}}); err != nil {
		t.Fatalf("the create once the cluster is back: %v", err)
	}
	h1.ExpectChain("vm", "vda", "vm-vda.s1", "vm-vda.qcow2")
	h1.CheckClean("vm")
}

//go:build xen && libxl

package xen

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/libxl"
)

// The guest (image/guest-init.sh) writes record N to sector N of every
// disk once a second, and N to sector 0: "xlsnap <disk> seq=N".
const (
	sector   = 512
	diskSize = "16M"
	// Where dom0 keeps the test's images (its root, not the 9p share:
	// qdisk's QEMU opens them with O_DIRECT and locks).
	workDir = "/var/lib/xlsnap-xen"
)

var disks = []string{"xvda", "xvdb"}

// timing records one case's duration for the run's summary.
func timing(t *testing.T, what string, start time.Time) {
	d := time.Since(start).Seconds()
	t.Logf("TIMING %s %.2fs", what, d)
	if out := os.Getenv("XLSNAP_XEN_OUT"); out != "" {
		f, err := os.OpenFile(filepath.Join(out, "timings.txt"), os.O_APPEND|os.O_CREATE|os.O_WRONLY, 0o644)
		if err == nil {
			fmt.Fprintf(f, "%-40s %7.2fs\n", what, d)
			f.Close()
		}
	}
}

// run runs a command in dom0 and fails the test if it fails.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// guest is one PV test domain and its folders.
type guest struct {
	t    *testing.T
	name string
	dir  string // images
	defs string // the driver's folder of domain XML
	base map[string]string
	cfg  string // xl config
	typ  string // xl's type: pv unless set before start
}

func newGuest(t *testing.T, name string) *guest {
	g := &guest{t: t, name: name, dir: filepath.Join(workDir, name, "images"), defs: filepath.Join(workDir, name, "defs"), base: map[string]string{}}
	os.RemoveAll(filepath.Join(workDir, name))
	for _, d := range []string{g.dir, g.defs} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	var xml strings.Builder
	fmt.Fprintf(&xml, "<domain type='xen'><name>%s</name><memory unit='MiB'>128</memory><os><type>linux</type></os><devices>\n", name)
	for _, d := range disks {
		p := filepath.Join(g.dir, d+".qcow2")
		run(t, "qemu-img", "create", "-q", "-f", "qcow2", p, diskSize)
		g.base[d] = p
		fmt.Fprintf(&xml, "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='%s'/><target dev='%s' bus='xen'/></disk>\n", p, d)
	}
	xml.WriteString("</devices></domain>\n")
	if err := os.WriteFile(filepath.Join(g.defs, name+".xml"), []byte(xml.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	return g
}

// start creates the domain with xl on the given disk images (the base
// images when nil) and waits until the guest has written a few records.
func (g *guest) start(images map[string]string) {
	t := g.t
	t.Helper()
	if images == nil {
		images = g.base
	}
	var specs []string
	for _, d := range disks {
		specs = append(specs, fmt.Sprintf("'format=qcow2, vdev=%s, access=rw, backendtype=qdisk, target=%s'", d, images[d]))
	}
	g.cfg = filepath.Join(workDir, g.name, "xl.cfg")
	typ := g.typ
	if typ == "" {
		typ = "pv"
	}
	cfg := fmt.Sprintf(`name = "%s"
type = "%s"
kernel = "/vmlinuz"
ramdisk = "/guest-initrd.img"
extra = "console=hvc0 quiet"
memory = 128
vcpus = 1
on_crash = "destroy"
disk = [ %s ]
`, g.name, typ, strings.Join(specs, ", "))
	if typ == "pvh" {
		// Under QEMU's TCG, SVM gives Xen no next-instruction pointer and
		// Xen's instruction-length decoder has no RDTSCP: hidden, the
		// guest's clock reads use RDTSC, which it knows.
		cfg += "cpuid = \"host,rdtscp=0\"\n"
	}
	if err := os.WriteFile(g.cfg, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	run(t, "xl", "create", "-q", g.cfg)
	timing(t, g.name+": xl create", t0)
	t1 := time.Now()
	g.waitConnected()
	timing(t, g.name+": disks connected", t1)
	for _, d := range disks {
		g.waitSeq(images[d], d, 3)
	}
	timing(t, g.name+": first records written", t1)
	t.Cleanup(func() { exec.Command("xl", "destroy", g.name).Run() })
}

// waitConnected waits for every disk's back end to reach state 4.
func (g *guest) waitConnected() {
	t := g.t
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		out, _ := exec.Command("xl", "block-list", g.name).CombinedOutput()
		n := 0
		for _, line := range strings.Split(string(out), "\n")[1:] {
			f := strings.Fields(line)
			if len(f) >= 4 && f[3] == "4" {
				n++
			}
		}
		if n == len(disks) {
			return
		}
		time.Sleep(500 * time.Millisecond)
	}
	out, _ := exec.Command("xl", "block-list", g.name).CombinedOutput()
	t.Fatalf("%s: disks not connected after 3 min:\n%s\n%s", g.name, out, g.console())
}

func (g *guest) console() string {
	out, _ := exec.Command("sh", "-c", "tail -n 30 /var/log/xen/console/guest-"+g.name+".log 2>/dev/null; xl dmesg | tail -n 10").CombinedOutput()
	return string(out)
}

// records reads an image (its whole chain) and returns the last record
// number of sector 0 and the records found in sectors 1.. in order. With
// shared, the image may be open in a running device model (qemu-img -U).
func records(t *testing.T, image, disk string, shared bool) (last int, seqs []int) {
	t.Helper()
	raw := filepath.Join(os.TempDir(), fmt.Sprintf("read-%d.raw", time.Now().UnixNano()))
	defer os.Remove(raw)
	// The first MiB is enough: the guest writes one record a second.
	args := []string{"dd", "-f", "qcow2", "-O", "raw", "bs=512", "count=2048", "if=" + image, "of=" + raw}
	if shared {
		args = slices.Insert(args, 1, "-U")
	}
	// A read racing the device model's metadata updates (-U) can fail;
	// such a read is retried.
	for try := 1; ; try++ {
		os.Remove(raw)
		out, err := exec.Command("qemu-img", args...).CombinedOutput()
		if err == nil {
			break
		}
		if !shared || try == 20 {
			t.Fatalf("reading %s: %v\n%s", image, err, out)
		}
		t.Logf("reading %s while the guest runs (try %d): %v: %s", image, try, err, bytes.TrimSpace(out))
		time.Sleep(500 * time.Millisecond)
	}
	data, err := os.ReadFile(raw)
	if err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`^xlsnap ` + disk + ` seq=(\d+)\n`)
	parse := func(s []byte) int {
		m := re.FindSubmatch(s)
		if m == nil {
			return 0
		}
		n, _ := strconv.Atoi(string(m[1]))
		return n
	}
	last = parse(data[:sector])
	for i := 1; (i+1)*sector <= len(data); i++ {
		s := data[i*sector : (i+1)*sector]
		if bytes.Count(s, []byte{0}) == sector {
			continue
		}
		seqs = append(seqs, parse(s))
		// A live read (-U) may catch the device model mid-write; only
		// a stopped guest's images must be exact.
		if n := parse(s); n != i && !shared {
			t.Errorf("%s: sector %d holds %q, want record %d", image, i, bytes.TrimRight(s, "\x00"), i)
		}
	}
	return last, seqs
}

// expectRecords checks an image (after the guest stopped) holds records
// 1..last with none missing and last >= atLeast, runs qemu-img check and
// returns last.
func expectRecords(t *testing.T, image, disk string, atLeast int) int {
	t.Helper()
	run(t, "qemu-img", "check", "-q", image)
	last, seqs := records(t, image, disk, false)
	// The guest writes record N's sector, then N into sector 0: stopped
	// between the two, the sectors hold one record more.
	if (len(seqs) != last && len(seqs) != last+1) || last < atLeast {
		t.Fatalf("%s: sector 0 says %d, sectors hold %d records (...%v), want at least %d, none missing", image, last, len(seqs), head(seqs), atLeast)
	}
	t.Logf("%s (%s): records 1..%d intact, qemu-img check clean", image, disk, last)
	return last
}

func head(s []int) []int {
	if len(s) > 10 {
		return s[len(s)-10:]
	}
	return s
}

// waitSeq waits until the image's chain reads record n or later.
func (g *guest) waitSeq(image, disk string, n int) int {
	t := g.t
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for time.Now().Before(deadline) {
		if last, _ := records(t, image, disk, true); last >= n {
			return last
		}
		time.Sleep(time.Second)
	}
	t.Fatalf("%s: %s did not reach record %d in 3 min\n%s", g.name, image, n, g.console())
	return 0
}

func (g *guest) stop() {
	g.t.Helper()
	t0 := time.Now()
	run(g.t, "xl", "destroy", g.name)
	timing(g.t, g.name+": xl destroy", t0)
}

// openDriver opens xlsnap's driver over the guest's definition folder,
// with h (nil: no hypervisor back end at all).
func (g *guest) openDriver(h xenlight.Hypervisor) *driver.Driver {
	t := g.t
	t.Helper()
	src, err := driver.NewDirSource(g.defs)
	if err != nil {
		t.Fatal(err)
	}
	d, err := driver.Open(context.Background(), driver.Config{StateDir: filepath.Join(workDir, g.name, "state"), Source: src, Pools: []string{g.dir}, Hypervisor: h})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// chains is the device model's view of the disks, by QMP at libxl's
// /var/run/xen/qmp-libxl-<domid>, the socket both the libxl and the
// libvirt back end's DeviceModel use.
func (g *guest) chains(h xenlight.Hypervisor) []xenlight.DiskChain {
	t := g.t
	t.Helper()
	m, err := h.DeviceModel(context.Background(), g.name)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Disconnect()
	c, err := xenlight.Chains(context.Background(), m)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// expectChain asserts a disk whose chain bottoms at base reads files.
func (g *guest) expectChain(chains []xenlight.DiskChain, files ...string) {
	g.t.Helper()
	for _, c := range chains {
		if c.Files[len(c.Files)-1] == files[len(files)-1] {
			if !slices.Equal(c.Files, files) {
				g.t.Fatalf("device model chain %v (node %s), want %v", c.Files, c.Node, files)
			}
			g.t.Logf("query-block: node %s chain %v", c.Node, c.Files)
			return
		}
	}
	g.t.Fatalf("no device model disk over %s: %+v", files[len(files)-1], chains)
}

func (g *guest) diskList(d *driver.Driver) map[string]driver.DiskInfo {
	g.t.Helper()
	list, err := d.DiskList(context.Background(), g.name)
	if err != nil {
		g.t.Fatal(err)
	}
	out := map[string]driver.DiskInfo{}
	for _, di := range list {
		out[di.Target] = di
	}
	return out
}

// externalRequest asks for an external snapshot of every disk, each
// overlay DISK.NAME.qcow2 in the guest's image folder; it returns the
// request and the overlays by disk.
func (g *guest) externalRequest(name string) (driver.SnapshotRequest, map[string]string) {
	req := driver.SnapshotRequest{Name: name}
	overlays := map[string]string{}
	for _, disk := range disks {
		overlays[disk] = filepath.Join(g.dir, disk+"."+name+".qcow2")
		req.Disks = append(req.Disks, driver.DiskRequest{Name: disk, External: true, ExternalFormat: "qcow2", ExternalPath: overlays[disk]})
	}
	return req, overlays
}

func newLibxl(t *testing.T) *libxl.Hypervisor {
	t.Helper()
	h, err := libxl.New()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

func TestMain(m *testing.M) {
	if _, err := os.Stat("/proc/xen/capabilities"); err != nil {
		fmt.Fprintln(os.Stderr, "not in a Xen dom0 (no /proc/xen/capabilities): these tests run inside the test bed (make test-xen)")
		os.Exit(1)
	}
	if os.Getenv("XLSNAP_XEN_HELPER") != "" {
		os.Exit(toolstackHelper())
	}
	os.Exit(m.Run())
}

// TestLiveSnapshotAndMerge: a disk-only live snapshot of both disks of a
// writing guest as one QMP transaction, the chain as query-block shows
// it, then the delete's live merge, the guest writing throughout; the
// data is read back from the images after the guest stops.
func TestLiveSnapshotAndMerge(t *testing.T) {
	ctx := context.Background()
	g := newGuest(t, "g1")
	g.start(nil)
	h := newLibxl(t)
	d := g.openDriver(h)

	req, overlays := g.externalRequest("s1")
	t0 := time.Now()
	if _, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly|driver.CreateAtomic); err != nil {
		t.Fatalf("live disk-only snapshot: %v\n%s", err, g.console())
	}
	timing(t, "case 1: live disk-only snapshot, 2 disks", t0)
	chains := g.chains(h)
	frozen := map[string]int{}
	for _, disk := range disks {
		g.expectChain(chains, overlays[disk], g.base[disk])
		if di := g.diskList(d)[disk]; di.Source != overlays[disk] {
			t.Fatalf("DiskList %s: %+v, want the overlay %s", disk, di, overlays[disk])
		}
		frozen[disk], _ = records(t, g.base[disk], disk, true)
	}
	// One transaction: both bases stop within the same round of writes
	// (the guest writes xvda then xvdb for each record).
	if a, b := frozen["xvda"], frozen["xvdb"]; a != b && a != b+1 {
		t.Fatalf("bases frozen at records xvda=%d xvdb=%d: not one point in time", a, b)
	}
	t.Logf("bases frozen at xvda=%d xvdb=%d", frozen["xvda"], frozen["xvdb"])
	var after int
	for _, disk := range disks {
		after = g.waitSeq(overlays[disk], disk, frozen[disk]+3)
		if now, _ := records(t, g.base[disk], disk, true); now != frozen[disk] {
			t.Fatalf("%s: base moved from record %d to %d after the snapshot", disk, frozen[disk], now)
		}
	}

	// case 2: delete s1 while the guest writes: live merge.
	t0 = time.Now()
	rep, err := d.SnapshotDelete(ctx, g.name, "s1", 0)
	if err != nil {
		t.Fatalf("live delete: %v\n%s", err, g.console())
	}
	timing(t, "case 2: delete with live merge, 2 disks", t0)
	repJSON, _ := json.Marshal(rep)
	t.Logf("delete report: %s", repJSON)
	chains = g.chains(h)
	active := map[string]string{}
	for _, disk := range disks {
		di := g.diskList(d)[disk]
		if len(di.Chain) != 1 {
			t.Fatalf("after the delete %s's recorded chain is %v, want one image", disk, di.Chain)
		}
		active[disk] = di.Source
		g.expectChain(chains, di.Source)
	}
	for _, disk := range disks {
		after = g.waitSeq(active[disk], disk, after+3)
	}
	g.stop()
	for _, disk := range disks {
		expectRecords(t, active[disk], disk, after)
		if _, err := os.Stat(overlays[disk]); err == nil && active[disk] != overlays[disk] {
			t.Errorf("%s: merged overlay %s still on disk", disk, overlays[disk])
		}
	}

	// case 3: the guest shut off, a driver with no hypervisor back end:
	// snapshot, write, revert, delete, all through qemu-img.
	t.Run("offline", func(t *testing.T) { offline(t, g, active, after) })
}

func offline(t *testing.T, g *guest, active map[string]string, records0 int) {
	ctx := context.Background()
	g.t = t
	d := g.openDriver(nil)
	t0 := time.Now()
	req, _ := g.externalRequest("off1")
	if _, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly); err != nil {
		t.Fatal(err)
	}
	timing(t, "case 3: offline snapshot", t0)
	// Write past the snapshot into the new active layers (sector 0 and a
	// far sector), as a guest would.
	top := map[string]string{}
	for _, disk := range disks {
		top[disk] = g.diskList(d)[disk].Source
		run(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 8M 512", top[disk])
	}
	t0 = time.Now()
	if err := d.RevertToSnapshot(ctx, g.name, "off1", 0); err != nil {
		t.Fatal(err)
	}
	timing(t, "case 3: offline revert", t0)
	for _, disk := range disks {
		now := g.diskList(d)[disk].Source
		out := run(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0 8M 512", now)
		if strings.Contains(out, "Pattern verification failed") {
			t.Fatalf("%s: after the revert %s still holds the write made after the snapshot", disk, now)
		}
		expectRecords(t, now, disk, records0)
	}
	t0 = time.Now()
	if _, err := d.SnapshotDelete(ctx, g.name, "off1", 0); err != nil {
		t.Fatal(err)
	}
	timing(t, "case 3: offline delete", t0)
	for _, disk := range disks {
		di := g.diskList(d)[disk]
		for _, p := range di.Chain {
			run(t, "qemu-img", "check", "-q", p)
		}
		expectRecords(t, di.Source, disk, records0)
	}
	problems, err := d.Storage().Check(ctx)
	if err != nil || len(problems) > 0 {
		t.Fatalf("storage check: %v %+v", err, problems)
	}
}

// TestSaveRestoreAfterLiveSnapshot: the hazard. After a live snapshot
// libxl's stored configuration still names the old images; a restore from
// it would write into what is now the overlay's backing file. Restoring
// with the configuration repointed at the overlays (libxl.RepointDisks)
// keeps the guest writing into the overlays.
func TestSaveRestoreAfterLiveSnapshot(t *testing.T) {
	ctx := context.Background()
	g := newGuest(t, "g2")
	g.start(nil)
	h := newLibxl(t)
	d := g.openDriver(h)
	req, overlays := g.externalRequest("h1")
	t0 := time.Now()
	if _, err := d.CreateSnapshot(ctx, g.name, req, driver.CreateDiskOnly|driver.CreateAtomic); err != nil {
		t.Fatal(err)
	}
	timing(t, "case 4: live snapshot", t0)
	frozen := map[string]int{}
	var mark int
	for _, disk := range disks {
		frozen[disk], _ = records(t, g.base[disk], disk, true)
		mark = g.waitSeq(overlays[disk], disk, frozen[disk]+2)
	}
	def, err := h.Definition(ctx, g.name)
	if err != nil {
		t.Fatal(err)
	}
	for _, disk := range disks {
		if !strings.Contains(def, g.base[disk]) || strings.Contains(def, overlays[disk]) {
			t.Errorf("libxl's stored configuration already names the overlay of %s: the hazard this test guards is gone", disk)
		} else {
			t.Logf("libxl's stored configuration still names %s for %s (the hazard)", g.base[disk], disk)
		}
	}
	mem := filepath.Join(workDir, g.name, "g2.save")
	t0 = time.Now()
	if err := h.SaveMemory(ctx, g.name, mem, false); err != nil {
		t.Fatalf("save: %v\n%s", err, g.console())
	}
	timing(t, "case 4: save (libxl)", t0)
	if st, err := h.State(ctx, g.name); err != nil || st != xenlight.Shutoff {
		t.Fatalf("after the save the domain is %s (%v), want shutoff", st, err)
	}
	repoint := map[string]libxl.Disk{}
	for _, disk := range disks {
		repoint[disk] = libxl.Disk{Path: overlays[disk], Format: "qcow2"}
	}
	def, err = libxl.RepointDisks(def, repoint)
	if err != nil {
		t.Fatal(err)
	}
	t0 = time.Now()
	if err := h.Restore(ctx, g.name, mem, def, false); err != nil {
		t.Fatalf("restore: %v\n%s", err, g.console())
	}
	timing(t, "case 4: restore onto the overlays (libxl)", t0)
	chains := g.chains(h)
	for _, disk := range disks {
		g.expectChain(chains, overlays[disk], g.base[disk])
	}
	var after int
	for _, disk := range disks {
		after = g.waitSeq(overlays[disk], disk, mark+3)
	}
	g.stop()
	for _, disk := range disks {
		run(t, "qemu-img", "check", "-q", g.base[disk])
		if now, _ := records(t, g.base[disk], disk, false); now != frozen[disk] {
			t.Fatalf("%s: the base moved from record %d to %d: the restored guest wrote into it", disk, frozen[disk], now)
		}
		expectRecords(t, overlays[disk], disk, after)
	}
}

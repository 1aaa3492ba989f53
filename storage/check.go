package storage

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/internal/fsutil"
	"github.com/xlsnap/xlsnap/internal/qemuimg"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// ProblemKind classifies what Check found.
type ProblemKind string

const (
	ProblemPending         ProblemKind = "pending-operation" // an intent is in the journal
	ProblemMissingImage    ProblemKind = "missing-image"     // metadata names an image that is not there
	ProblemChainDiffers    ProblemKind = "chain-differs"     // a disk's chain on disk is not the recorded one
	ProblemBadImage        ProblemKind = "bad-image"         // qemu-img check or the chain reader refuses an image
	ProblemOrphan          ProblemKind = "orphan-image"      // an overlay of a known image that no record holds and no definition reads
	ProblemSharedBase      ProblemKind = "shared-base"       // a known image that images no record holds are backed by
	ProblemDetached        ProblemKind = "detached-data"     // the data of a disk that left the definition: the user's, kept
	ProblemTempFile        ProblemKind = "temp-file"         // a new image a crash left under its temporary name
	ProblemStaleBackup     ProblemKind = "stale-backup"      // the store\'s copy could not be refreshed after a change
	ProblemUsersUnknown    ProblemKind = "users-unknown"     // what finds an image\'s users could not be read (a definition, a pool file)
	ProblemSetAside        ProblemKind = "set-aside"         // an operation Repair set aside, awaiting a person
	ProblemDamagedSnapshot ProblemKind = "damaged-snapshot"  // a snapshot whose images a set-aside operation may have merged
	ProblemCoalescible     ProblemKind = "coalescible"       // a disk's chain holds layers nothing needs: Coalesce would merge them
	ProblemHeld            ProblemKind = "held"              // a domain held for an outside edit of a chain: not repaired meanwhile
)

// Informational reports a finding that is no fault: a shared base is
// how pools are used, reported so its users are known.
// An orphan is one too: xlsnap makes new images under temporary names, so
// an unrecorded overlay is someone's own (a clone not yet defined). So is
// a chain that could be shorter: its data is all there; and a hold, an
// edit announced.
func (k ProblemKind) Informational() bool {
	return k == ProblemSharedBase || k == ProblemDetached || k == ProblemOrphan || k == ProblemCoalescible || k == ProblemHeld
}

// Problem is one finding; Fixed says Repair mended it, Note why not.
type Problem struct {
	Kind   ProblemKind `json:"kind"`
	Domain string      `json:"domain,omitempty"`
	Disk   string      `json:"disk,omitempty"`
	Path   string      `json:"path,omitempty"`
	Detail string      `json:"detail"`
	Fixed  bool        `json:"fixed,omitempty"`
	Note   string      `json:"note,omitempty"`
}

// Check compares metadata with the disks and reports every difference.
func (m *Manager) Check(ctx context.Context) ([]Problem, error) {
	return m.check(ctx, false)
}

// Repair finishes pending operations and rescans chains that changed on
// disk. What it cannot mend safely (a missing image, an orphan) stays
// reported; it removes no image.
func (m *Manager) Repair(ctx context.Context) ([]Problem, error) {
	return m.check(ctx, true)
}

func (m *Manager) check(ctx context.Context, repair bool) ([]Problem, error) {
	var problems []Problem
	if repair {
		// What recovery can neither finish nor undo is set aside below.
		_ = m.Recover(ctx)
	}
	var intents []*intent
	var domains []*Domain
	snaps := map[string][]*Snapshot{}
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		var err error
		if intents, err = tx.Intents(); err != nil {
			return err
		}
		domains, snaps, err = allRecords(tx, true)
		return err
	})
	if err != nil {
		return nil, err
	}
	for _, in := range intents {
		if !m.mine(in.Domain) {
			continue // another source's, finished from there
		}
		name := in.Domain
		for _, d := range domains {
			if d.Name == in.Domain {
				name = domainName(d)
			}
		}
		pr := Problem{Kind: ProblemPending, Domain: name,
			Detail: fmt.Sprintf("%s %s (committed %v)", in.Op, in.ID, in.Committed)}
		if in.Guest != nil {
			pr.Note = "hypervisor steps: the driver finishes them (resume, restore) when the domain is next used"
		} else if repair && !(in.Live && !in.Committed) {
			if file, err := m.setAside(ctx, in); err != nil {
				pr.Note = err.Error()
			} else {
				pr.Fixed, pr.Note = true, "neither finished nor undone: set aside in "+file+" (nothing removed)"
			}
		} else if in.Live && !in.Committed {
			pr.Note = "finished or undone by the domain's next call: through its device model while it runs, from the images once it is shut off"
		}
		problems = append(problems, pr)
	}
	problems = append(problems, m.staleTemps(ctx, repair)...)
	if why, err := os.ReadFile(staleBackupMark(m.stateDir)); err == nil {
		pr := Problem{Kind: ProblemStaleBackup, Path: staleBackupMark(m.stateDir),
			Detail: "the copy check --restore would put back is older than the store: " + strings.TrimSpace(string(why))}
		if repair && m.backup(ctx) == nil {
			if _, err := os.Stat(staleBackupMark(m.stateDir)); errors.Is(err, fs.ErrNotExist) {
				pr.Fixed = true
			}
		}
		problems = append(problems, pr)
	}
	// A set-aside operation stays reported until a person has judged it
	// and removed its report.
	if reports, _ := filepath.Glob(filepath.Join(m.stateDir, "set-aside", "*.json")); len(reports) > 0 {
		for _, r := range reports {
			problems = append(problems, Problem{Kind: ProblemSetAside, Path: r,
				Detail: "an operation recovery could neither finish nor undo", Note: "review it, then remove the report"})
		}
	}
	for _, d := range domains {
		if !m.mine(d.Name) {
			continue
		}
		for _, s := range snaps[d.Name] {
			if s.Damaged != "" {
				problems = append(problems, Problem{Kind: ProblemDamagedSnapshot, Domain: domainName(d), Detail: "snapshot " + s.Name + ": " + s.Damaged})
			}
		}
	}
	known := map[string]bool{}
	for _, d := range domains {
		for p := range d.Images {
			known[p] = true
		}
		if m.mine(d.Name) {
			fix := repair
			if h := d.Hold; h != nil && !h.Expired(time.Now()) {
				// An outside edit is under way: what looks broken may
				// be half of it, and the rescan that ends it takes it in.
				fix = false
				problems = append(problems, Problem{Kind: ProblemHeld, Domain: domainName(d), Disk: h.Disk,
					Detail: fmt.Sprintf("held by chain-changing (hold %s from host %s until %s)", h.ID, h.Host, h.Until.UTC().Format(time.RFC3339)),
					Note:   "not repaired while held; xlsnap rescan " + domainName(d) + " " + h.Disk + " ends the hold"})
			}
			problems = append(problems, m.checkDomain(ctx, d, snaps[d.Name], fix)...)
		}
	}
	problems = append(problems, m.orphans(ctx, known)...)
	for _, d := range domains {
		if m.mine(d.Name) {
			problems = append(problems, m.coalescible(ctx, d, snaps[d.Name])...)
		}
	}
	return problems, nil
}

// coalescible reports, disk by disk, how many layers Coalesce would
// merge away (each judged as if it were the only one, offline).
func (m *Manager) coalescible(ctx context.Context, d *Domain, list []*Snapshot) []Problem {
	snaps := map[string]*Snapshot{}
	for _, s := range list {
		snaps[s.Name] = s
	}
	merges, err := m.mergeable(ctx, d, snaps, nil, nil)
	if err != nil {
		return []Problem{{Kind: ProblemUsersUnknown, Domain: domainName(d), Detail: "looking for layers to coalesce: " + err.Error()}}
	}
	byDisk := map[string][]string{}
	var order []string
	for _, mg := range merges {
		if byDisk[mg.Disk] == nil {
			order = append(order, mg.Disk)
		}
		byDisk[mg.Disk] = append(byDisk[mg.Disk], mg.Layer)
	}
	var problems []Problem
	for _, disk := range order {
		layers := byDisk[disk]
		pr := Problem{Kind: ProblemCoalescible, Domain: domainName(d), Disk: disk, Path: layers[0],
			Detail: fmt.Sprintf("the chain could be %d layer%s shorter: nothing needs %s",
				len(layers), plural(len(layers)), strings.Join(layers, ", ")),
			Note: "xlsnap coalesce " + domainName(d) + " merges them"}
		if dk := d.Disk(disk); dk != nil {
			pr.Path = dk.Active
		}
		problems = append(problems, pr)
	}
	return problems
}

func plural(n int) string {
	if n == 1 {
		return ""
	}
	return "s"
}

func (m *Manager) checkDomain(ctx context.Context, d *Domain, snaps []*Snapshot, repair bool) []Problem {
	var problems []Problem
	paths := make([]string, 0, len(d.Images))
	for p := range d.Images {
		paths = append(paths, p)
	}
	sort.Strings(paths)
	for _, p := range paths {
		if d.Images[p].Detached && exists(p) {
			problems = append(problems, Problem{Kind: ProblemDetached, Domain: domainName(d), Path: p,
				Detail: "holds the data of a disk that left the definition (or names another file now): kept for you; remove it when you no longer want it"})
		}
		if !exists(p) {
			pr := Problem{Kind: ProblemMissingImage, Domain: domainName(d), Path: p, Detail: "recorded image does not exist"}
			if users := snapshotsUsing(snaps, p); len(users) > 0 {
				pr.Detail += fmt.Sprintf("; snapshots %v need it", users)
			}
			problems = append(problems, pr)
			continue
		}
		if b, err := m.backendFor(p); err == nil {
			if err := b.Check(ctx, p, d.Images[p].Format); err != nil {
				pr := Problem{Kind: ProblemBadImage, Domain: domainName(d), Path: p, Detail: err.Error()}
				if lr, ok := b.(LeakRepairer); ok && repair && errors.Is(err, ErrLeaks) {
					if err := lr.RepairLeaks(ctx, p, d.Images[p].Format); err != nil {
						pr.Note = err.Error()
					} else {
						pr.Fixed = true
					}
				}
				problems = append(problems, pr)
			}
		}
	}
	for _, disk := range d.Disks {
		recorded := d.Chain(disk.Active)
		c, err := chain.Walk(ctx, disk.Active, chain.Format(disk.Format), m.policy())
		if err != nil {
			problems = append(problems, Problem{Kind: ProblemBadImage, Domain: domainName(d), Disk: disk.Target, Path: disk.Active, Detail: err.Error()})
			continue
		}
		onDisk := layerPaths(c)
		if slices.Equal(recorded, onDisk) {
			continue
		}
		pr := Problem{Kind: ProblemChainDiffers, Domain: domainName(d), Disk: disk.Target, Path: disk.Active,
			Detail: fmt.Sprintf("recorded %v, on disk %v", recorded, onDisk)}
		if repair {
			if _, err := m.ChainChanged(ctx, d.Name, disk.Target, nil); err != nil {
				pr.Note = err.Error()
			} else {
				pr.Fixed = true
			}
		}
		problems = append(problems, pr)
	}
	return problems
}

func snapshotsUsing(snaps []*Snapshot, path string) []string {
	var out []string
	for _, s := range snaps {
		for _, sd := range s.Disks {
			if sd.Image == path {
				out = append(out, s.Name)
			}
		}
	}
	return out
}

func layerPaths(c *chain.Chain) []string {
	out := make([]string, len(c.Layers))
	for i, l := range c.Layers {
		out[i] = filepath.Clean(l.Path)
	}
	return out
}

// orphans looks at the pools as they are: an image backed by a recorded
// image that no record holds is either another user of that image (a
// linked clone a definition reads: the recorded image is a shared base,
// reported with its users) or an orphan no definition reads. Neither is
// ever removed here: xlsnap removes only images its own records made.
func (m *Manager) orphans(ctx context.Context, known map[string]bool) []Problem {
	u, err := m.scanUsers(ctx)
	if err != nil {
		return []Problem{{Kind: ProblemUsersUnknown, Detail: err.Error(), Note: "merges and removals wait until it can be read"}}
	}
	var problems []Problem
	bases := map[string][]User{}
	var baseOrder []string
	// Known images by identity: a pool reached through a symlink names
	// them otherwise.
	knownKeys := map[fileKey]string{}
	for p := range known {
		if k, st := keyOf(p); st != nil {
			knownKeys[k] = p
		}
	}
	for _, p := range m.pools {
		walkPool(ctx, p.backend.Root(), func(path string) error {
			k, st := keyOf(path)
			if _, ok := knownKeys[k]; ok || st == nil {
				return nil
			}
			ref, err := m.headers.backingOf(path, k, st)
			if err != nil {
				return nil
			}
			targets, err := backingTargets(path, ref)
			if err != nil {
				problems = append(problems, Problem{Kind: ProblemBadImage, Path: path, Detail: err.Error()})
				return nil
			}
			for _, t := range targets {
				tk, _ := keyOf(t)
				backing, ok := knownKeys[tk]
				if !ok {
					continue
				}
				var named []User
				for _, usr := range u.of(path) {
					if usr.Kind == UserDefinition {
						named = append(named, usr)
					}
				}
				if len(named) == 0 {
					problems = append(problems, Problem{Kind: ProblemOrphan, Path: path,
						Detail: "overlay of " + backing + " that no record holds and no definition reads",
						Note:   "kept: xlsnap removes only images its records hold"})
				}
				if bases[backing] == nil {
					baseOrder = append(baseOrder, backing)
				}
				usr := User{Kind: UserOverlay, Path: path}
				if len(named) > 0 {
					usr = named[0]
				}
				bases[backing] = append(bases[backing], usr)
			}
			return nil
		})
	}
	for _, b := range baseOrder {
		problems = append(problems, Problem{Kind: ProblemSharedBase, Path: b,
			Detail: "recorded image is also the base of " + DescribeUsers(bases[b]) + ": kept while they use it"})
	}
	return problems
}

// treeUnder reports whether d's tree holds an image inside folder dir.
func treeUnder(d *Domain, dir string) bool {
	for p := range d.Images {
		if strings.HasPrefix(p, dir+"/") {
			return true
		}
	}
	return false
}

// checkMove checks that the image at n is the recorded image o moved (or
// copied): it has o's format and virtual size, its backing reference
// names o's backing image (moved, if that moved too), and, while o is
// still there as another file, the disk's chain on disk reads it.
func checkMove(ctx context.Context, d *Domain, o, n string, moved map[string]string, onDisk []string) error {
	rec := d.Images[o]
	bad := func(why string, args ...any) error {
		return fmt.Errorf("%w: %s is not %s moved: %s", ErrInvalidArg, n, o, fmt.Sprintf(why, args...))
	}
	os1, oerr := os.Stat(o)
	ns, err := os.Stat(n)
	if err != nil {
		return bad("%v", err)
	}
	if oerr == nil && !os.SameFile(os1, ns) && !slices.Contains(onDisk, n) {
		return bad("%s is still there and the disk's chain does not read %s", o, n)
	}
	if oerr == nil && !os.SameFile(os1, ns) {
		// A copy, with the old file still there: the chain reading the
		// new one proves nothing of its data (an overlay rebased onto
		// another image reads it just as well).
		var q qemuimg.Runner
		if err := q.SameLayer(ctx, o, n, rec.Format); err != nil {
			return bad("it holds other data than %s: %v", o, err)
		}
	}
	size := func(p, format string) (uint64, string, error) {
		if format != "qcow2" {
			st, err := os.Stat(p)
			if err != nil {
				return 0, "", err
			}
			return uint64(st.Size()), "", nil
		}
		h, err := readHeader(p)
		if err != nil {
			return 0, "", err
		}
		b := ""
		if h.BackingFile != "" {
			b = filepath.Clean(chain.ResolveBacking(p, h.BackingFile))
		}
		return h.VirtualSize, b, nil
	}
	nsize, nback, err := size(n, rec.Format)
	if err != nil {
		return bad("as %s: %v", rec.Format, err)
	}
	wantBack := rec.Backing
	if mb, ok := moved[wantBack]; ok {
		wantBack = mb
	}
	if nback != wantBack {
		return bad("its backing file is %q, want %q", nback, wantBack)
	}
	if oerr == nil {
		osize, _, err := size(o, rec.Format)
		if err == nil && osize != nsize {
			return bad("%d bytes against %d", nsize, osize)
		}
	}
	return nil
}

// ChainChanged is the public "a chain changed, rescan" call: someone
// edited a disk's chain behind storage's back. It rereads the chain from
// the disk's active layer, records it, and tells every subscriber.
// moves maps images that were moved (old path to new) to their new
// names; a recorded layer that is gone where the chain on disk has a new
// one is taken as moved too. Every snapshot record naming a moved image
// is rewritten with its new name.
func (m *Manager) ChainChanged(ctx context.Context, domain, disk string, moves map[string]string) (*chain.Chain, error) {
	unlock, err := m.lockDomain(ctx, domain)
	if err != nil {
		return nil, err
	}
	defer unlock()
	if len(moves) > 0 {
		// A moved file whose old name another image still reads: the
		// records would say the moved one serves this chain alone, and
		// a later merge could write into what that image reads.
		if _, err := m.scanUsers(ctx); err != nil {
			return nil, fmt.Errorf("taking in the move: %w", err)
		}
	}
	var c *chain.Chain
	var ev ChainChanged
	err = m.store.Update(ctx, func(tx metastore.Tx) error {
		d, err := m.domain(tx, domain)
		if err != nil {
			return err
		}
		dk := d.Disk(disk)
		if dk == nil {
			return fmt.Errorf("%w: domain %s has no disk %q", ErrInvalidArg, domainName(d), disk)
		}
		before := d.Chain(dk.Active)
		if c, err = chain.Walk(ctx, dk.Active, chain.Format(dk.Format), m.policy()); err != nil {
			return err
		}
		moved := map[string]string{}
		for o, n := range moves {
			o, n = filepath.Clean(o), filepath.Clean(n)
			// A folder moved moves every image of the tree inside it.
			pairs := map[string]string{}
			if _, known := d.Images[o]; known {
				pairs[o] = n
			} else {
				for p := range d.Images {
					if rel, ok := strings.CutPrefix(p, o+"/"); ok {
						pairs[p] = filepath.Join(n, rel)
					}
				}
			}
			if len(pairs) == 0 {
				if _, known := d.Images[n]; known || treeUnder(d, n) {
					continue // followed already (the definition named the moved chain)
				}
				return fmt.Errorf("%w: moved %s is no image or folder of domain %s's tree", ErrInvalidArg, o, domainName(d))
			}
			found := false
			for po, pn := range pairs {
				if !exists(pn) {
					continue // not there (a folder's move may hold fewer images than the tree)
				}
				moved[po], found = pn, true
			}
			if !found {
				return fmt.Errorf("%w: nothing of %s is at %s", ErrInvalidArg, o, n)
			}
		}
		// The operator's word is checked against the images: each new
		// file must be the old one moved.
		onDisk := layerPaths(c)
		for po, pn := range moved {
			if err := checkMove(ctx, d, po, pn, moved, onDisk); err != nil {
				return err
			}
		}
		detectMoves(d, before, onDisk, moved)
		m.recordChain(d, c)
		if err := m.applyMoves(tx, d, moved); err != nil {
			return err
		}
		ev = ChainChanged{Domain: domainName(d), Disk: disk, Before: before, After: layerPaths(c), Reason: "rescan"}
		return tx.PutDomain(d)
	})
	if err != nil {
		return nil, err
	}
	m.events.publish(ev)
	return c, m.backup(ctx)
}

// setAside takes an operation recovery could neither finish nor undo out
// of the journal, so its domain is usable again: the intent and the state
// of every file it names (there or not, size, backing reference) go to
// STATE/set-aside/ID.json for a person to judge. Nothing is removed.
func (m *Manager) setAside(ctx context.Context, in *intent) (string, error) {
	unlock, err := m.locks.lock(ctx, in.Domain, false)
	if err != nil {
		return "", err
	}
	defer unlock()
	type fileState struct {
		Path    string `json:"path"`
		Exists  bool   `json:"exists"`
		Size    int64  `json:"size,omitempty"`
		Backing string `json:"backing,omitempty"`
		Error   string `json:"error,omitempty"`
	}
	var files []fileState
	seen := map[string]bool{}
	// note records a file and, through its backing reference, every file
	// below it: a commit's target is its source's backing file.
	var note func(p string, depth int)
	note = func(p string, depth int) {
		if p == "" || seen[p] || depth > chain.DefaultMaxDepth {
			return
		}
		seen[p] = true
		fs := fileState{Path: p}
		if st, err := os.Stat(p); err == nil {
			fs.Exists, fs.Size = true, st.Size()
			k, sys := keyOf(p)
			if ref, err := m.headers.backingOf(p, k, sys); err != nil {
				fs.Error = err.Error()
			} else {
				fs.Backing = ref
			}
		}
		files = append(files, fs)
		if targets, err := backingTargets(p, fs.Backing); err == nil {
			for _, t := range targets {
				note(t, depth+1)
			}
		}
	}
	var walk func([]step)
	walk = func(steps []step) {
		for _, st := range steps {
			note(st.Path, 0)
			note(st.Backing, 0)
			note(st.UndoBacking, 0)
			note(st.Source, 0)
			walk(st.Group)
		}
	}
	walk(in.Steps)
	walk(in.Cleanup)
	report := struct {
		Intent *intent     `json:"intent"`
		Files  []fileState `json:"files"`
		At     string      `json:"set_aside_at"`
	}{in, files, time.Now().UTC().Format(time.RFC3339)}
	b, err := json.MarshalIndent(report, "", "  ")
	if err != nil {
		return "", err
	}
	dir := filepath.Join(m.stateDir, "set-aside")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", err
	}
	file := filepath.Join(dir, in.ID+".json")
	if err := fsutil.WriteFile(file, b, func(f *os.File) error { return f.Chmod(0o600) }); err != nil {
		return "", err
	}
	return file, m.store.Update(ctx, func(tx metastore.Tx) error {
		// Past its point of no return, the operation may have merged the
		// images of the snapshots it deletes: they stay listed, marked,
		// and a revert to them is refused.
		if in.PassedNoReturn && in.Commit != nil {
			for _, name := range in.Commit.DeleteSnapshots {
				s, err := tx.Snapshot(in.Domain, name)
				if errors.Is(err, metastore.ErrNotFound) {
					continue
				}
				if err != nil {
					return err
				}
				s.Damaged = fmt.Sprintf("an interrupted %s (set aside in %s) may have merged its images", in.Op, file)
				if err := tx.PutSnapshot(in.Domain, s); err != nil {
					return err
				}
			}
		}
		return tx.DeleteIntent(in.ID)
	})
}

// staleTempAge is how long a temporary image file must have been left
// alone before Repair takes it for a crash's leftover: a running
// qemu-img keeps writing (and touching) its own.
const staleTempAge = 10 * time.Minute

// staleTemps reports the temporary files a crash left: new images in the
// pools (TempName: never an image anything names), and the metadata
// store's own (a new store, a backup being written). With remove, it
// removes them.
func (m *Manager) staleTemps(ctx context.Context, remove bool) []Problem {
	var problems []Problem
	found := func(path, what string, info fs.FileInfo) {
		if time.Since(info.ModTime()) < staleTempAge {
			return // may be a running operation's
		}
		pr := Problem{Kind: ProblemTempFile, Path: path, Detail: what + " a crash left half-made"}
		if remove {
			if err := os.Remove(path); err != nil {
				pr.Note = err.Error()
			} else {
				pr.Fixed = true
			}
		}
		problems = append(problems, pr)
	}
	for _, p := range m.pools {
		filepath.WalkDir(p.backend.Root(), func(path string, e fs.DirEntry, err error) error {
			if err != nil || ctx.Err() != nil || !IsTempName(path) || !e.Type().IsRegular() {
				return nil
			}
			if info, err := e.Info(); err == nil {
				found(path, "a new image", info)
			}
			return nil
		})
	}
	entries, _ := os.ReadDir(m.stateDir)
	for _, e := range entries {
		n := e.Name()
		if !e.Type().IsRegular() || !strings.HasPrefix(n, "xlsnap.db.") || !(strings.Contains(n, ".new-") || strings.Contains(n, ".tmp-")) {
			continue
		}
		if info, err := e.Info(); err == nil {
			found(filepath.Join(m.stateDir, n), "a metadata file", info)
		}
	}
	return problems
}

package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
	"github.com/xlsnap/xlsnap/storage"
)

// The --json schema (docs/json.md). These structs are the command's own,
// apart from the driver's and storage's types, so a change inside the
// library never changes what scripts read. Rules: snake_case keys, every
// key always present (a missing string is "", a missing list is []),
// times in RFC 3339.

// snapshotJSON is one snapshot.
type snapshotJSON struct {
	Name         string     `json:"name"`
	Domain       string     `json:"domain"`
	Description  string     `json:"description"`
	Parent       string     `json:"parent"`
	Current      bool       `json:"current"`
	State        string     `json:"state"`
	CreationTime string     `json:"creation_time"`
	Location     string     `json:"location"`
	MemoryFile   string     `json:"memory_file"`
	Damaged      string     `json:"damaged"`
	Disks        []diskJSON `json:"disks"`
}

// diskJSON is how one disk took part in a snapshot.
type diskJSON struct {
	Target   string `json:"target"`
	Snapshot string `json:"snapshot"`
	Image    string `json:"image"`
	Overlay  string `json:"overlay"`
}

// treeJSON is a snapshot-list --tree node.
type treeJSON struct {
	snapshotJSON
	Children []treeJSON `json:"children"`
}

// infoJSON is snapshot-info.
type infoJSON struct {
	snapshotJSON
	NumChildren    int  `json:"num_children"`
	NumDescendants int  `json:"num_descendants"`
	Metadata       bool `json:"metadata"`
}

// xmlJSON is snapshot-dumpxml, snapshot-current without --name, and
// snapshot-create-as --print-xml.
type xmlJSON struct {
	Domain string `json:"domain"`
	Name   string `json:"name"`
	XML    string `json:"xml"`
}

// revertJSON is snapshot-revert.
type revertJSON struct {
	Domain   string `json:"domain"`
	Snapshot string `json:"snapshot"`
}

// deleteJSON is snapshot-delete.
type deleteJSON struct {
	Domain    string           `json:"domain"`
	Snapshot  string           `json:"snapshot"`
	Deleted   []string         `json:"deleted"`
	Disks     []diskReportJSON `json:"disks"`
	Collected []string         `json:"collected"`
	Coalesced []mergeJSON      `json:"coalesced"`
}

type diskReportJSON struct {
	Snapshot string     `json:"snapshot"`
	Disk     string     `json:"disk"`
	Action   string     `json:"action"`
	Kept     string     `json:"kept"`
	Removed  string     `json:"removed"`
	Users    []userJSON `json:"users"`
}

// userJSON is one user of an image that kept it as a shared base.
type userJSON struct {
	Kind     string `json:"kind"`
	Domain   string `json:"domain"`
	Disk     string `json:"disk"`
	Snapshot string `json:"snapshot"`
	Path     string `json:"path"`
	Host     string `json:"host,omitempty"`
}

// blockJSON is one disk of domblklist and rescan.
type blockJSON struct {
	Target  string   `json:"target"`
	Source  string   `json:"source"`
	Format  string   `json:"format"`
	Chain   []string `json:"chain"`
	Pending string   `json:"pending"`
}

// problemJSON is one finding of check.
type problemJSON struct {
	Kind          string `json:"kind"`
	Informational bool   `json:"informational"`
	Domain        string `json:"domain"`
	Disk          string `json:"disk"`
	Path          string `json:"path"`
	Detail        string `json:"detail"`
	Fixed         bool   `json:"fixed"`
	Note          string `json:"note"`
}

// restoreJSON is check --restore.
type restoreJSON struct {
	Store    string `json:"store"`
	Backup   string `json:"backup"`
	SetAside string `json:"set_aside"`
	Reason   string `json:"reason"`
}

// errorJSON is a failure on stderr: libvirt's code, its name and the
// message of the error line.
type errorJSON struct {
	Error errorBodyJSON `json:"error"`
}

type errorBodyJSON struct {
	Code    int    `json:"code"`
	Name    string `json:"name"`
	Message string `json:"message"`
}

// progressJSON is one line of a long job's progress on stderr.
type progressJSON struct {
	Progress progressBodyJSON `json:"progress"`
}

type progressBodyJSON struct {
	Operation string  `json:"operation"`
	Disk      string  `json:"disk"`
	Image     string  `json:"image"`
	Percent   float64 `json:"percent"`
}

func rfc3339(t time.Time) string { return t.UTC().Format(time.RFC3339) }

// location is libvirt's: external when the memory or any disk is in a
// file of its own.
func location(s *driver.Snapshot) string {
	if s.Memory != "" {
		return "external"
	}
	for _, sd := range s.Disks {
		if string(sd.Mode) == "external" {
			return "external"
		}
	}
	return "internal"
}

func toJSON(domain string, s *driver.Snapshot, current string) snapshotJSON {
	j := snapshotJSON{Name: s.Name, Domain: domain, Description: s.Description, Parent: s.Parent,
		Current: s.Name == current, State: s.State, CreationTime: rfc3339(s.Created), Location: location(s),
		MemoryFile: s.Memory, Damaged: s.Damaged, Disks: []diskJSON{}}
	for _, sd := range s.Disks {
		j.Disks = append(j.Disks, diskJSON{Target: sd.Target, Snapshot: string(sd.Mode), Image: sd.Image, Overlay: sd.Overlay})
	}
	return j
}

func deleteToJSON(domain, name string, r *driver.DeleteReport) deleteJSON {
	j := deleteJSON{Domain: domain, Snapshot: name, Deleted: orEmpty(r.Deleted), Disks: []diskReportJSON{}, Collected: orEmpty(r.Collected),
		Coalesced: mergesToJSON(r.Coalesced)}
	for _, d := range r.Disks {
		dj := diskReportJSON{Snapshot: d.Snapshot, Disk: d.Disk, Action: string(d.Action), Kept: d.Kept, Removed: d.Removed, Users: []userJSON{}}
		for _, u := range d.Users {
			dj.Users = append(dj.Users, userJSON{Kind: string(u.Kind), Domain: u.DomainName, Disk: u.Disk, Snapshot: u.Snapshot, Path: u.Path, Host: u.Host})
		}
		j.Disks = append(j.Disks, dj)
	}
	return j
}

func blocksToJSON(disks []driver.DiskInfo) []blockJSON {
	out := []blockJSON{}
	for _, d := range disks {
		out = append(out, blockJSON{Target: d.Target, Source: d.Source, Format: d.Format, Chain: orEmpty(d.Chain), Pending: d.Pending})
	}
	return out
}

func problemsToJSON(problems []driver.Problem) []problemJSON {
	out := []problemJSON{}
	for _, p := range problems {
		out = append(out, problemJSON{Kind: string(p.Kind), Informational: p.Kind.Informational(), Domain: p.Domain,
			Disk: p.Disk, Path: p.Path, Detail: p.Detail, Fixed: p.Fixed, Note: p.Note})
	}
	return out
}

func orEmpty(s []string) []string {
	if s == nil {
		return []string{}
	}
	return s
}

// Exit codes, as documented in the README and in --help.
const (
	exitOK      = 0 // the command did what it was asked
	exitFailed  = 1 // it failed: the error line (or object) says why
	exitProblem = 2 // check found problems (listed on stdout); nothing failed
)

// problemsFound is check's verdict when it found faults: the findings are
// the output, so it exits apart from a failure.
type problemsFound struct{ n int }

func (p problemsFound) Error() string { return fmt.Sprintf("%d problem(s) found", p.n) }

// reportError prints err as virsh does ("error: " and the message) or,
// under --json, as one errorJSON object, and returns the exit code.
func reportError(w io.Writer, asJSON bool, err error) int {
	code := exitFailed
	var pf problemsFound
	if errors.As(err, &pf) {
		code = exitProblem
	}
	if asJSON {
		c := errdefs.CodeOf(err)
		if pf.n > 0 {
			c = errdefs.CodeOperationFailed
		}
		if writeJSON(w, errorJSON{Error: errorBodyJSON{Code: int(c), Name: c.String(), Message: err.Error()}}) == nil {
			return code
		}
	}
	var lines errorLines
	if errors.As(err, &lines) {
		for _, e := range lines {
			fmt.Fprintf(w, "error: %v\n", e)
		}
		return code
	}
	fmt.Fprintf(w, "error: %v\n", err)
	return code
}

// progressJSONLines writes each whole percent of a long job as one JSON
// line, so a script reads progress without parsing a bar.
func progressJSONLines(w io.Writer) storage.Progress {
	last := map[string]int{}
	return func(op, disk, image string, percent float64) {
		key := op + "\x00" + disk + "\x00" + image
		if p, seen := last[key]; seen && p == int(percent) {
			return
		}
		last[key] = int(percent)
		b, err := json.Marshal(progressJSON{Progress: progressBodyJSON{Operation: op, Disk: disk, Image: image, Percent: percent}})
		if err == nil {
			fmt.Fprintf(w, "%s\n", b)
		}
	}
}

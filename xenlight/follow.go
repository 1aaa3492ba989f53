package xenlight

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/xlsnap/xlsnap/chain"
	"github.com/xlsnap/xlsnap/xenlight/qmp"
)

// Layer is one image of the chain a disk is to read: its path and its
// format, as storage recorded them (never probed).
type Layer struct {
	Path   string
	Format string
}

// blockNode is what query-named-block-nodes says of one node.
type blockNode struct {
	Node         string `json:"node-name"`
	Drv          string `json:"drv"`
	File         string `json:"file"`
	ReadOnly     bool   `json:"ro"`
	DetectZeroes string `json:"detect_zeroes"`
	Cache        *struct {
		Writeback bool `json:"writeback"`
		Direct    bool `json:"direct"`
		NoFlush   bool `json:"no-flush"`
	} `json:"cache"`
}

func namedNodes(ctx context.Context, m *qmp.Monitor) ([]blockNode, error) {
	var nodes []blockNode
	err := m.Execute(ctx, "query-named-block-nodes", map[string]any{"flat": true}, &nodes)
	return nodes, err
}

// Follow makes the device model read layers (top to base) for the disk
// whose active layer is layers[0], the chain storage recorded after an
// outside edit (images moved to other storage, say). The backing chain
// under the active layer is opened anew from the recorded files, each
// with its recorded format and an explicit backing, so no header chooses
// what is read (blockdev-add, bottom up); the active layer's node is
// switched to it (blockdev-reopen, QEMU 6.1 and later: the guest's I/O is
// drained for the switch, not stopped); then the active layer's header
// and those of the new nodes are made to name the files now read
// (change-backing-file, since a running domain's images are locked
// against qemu-img) and flushed. The old backing nodes are closed
// (blockdev-del where the monitor owns them), so the old files may be
// removed afterwards and their space is freed. It ends by reading the
// chain back (query-block).
//
// Nothing happens when the device model reads layers already. Errors: a
// *MismatchError (ErrChainMismatch, VIR_ERR_OPERATION_FAILED 9) where
// the device model cannot follow: it writes another image than
// layers[0], or that image's node has no name of its own (a -drive disk:
// blockdev-reopen addresses nodes by the name they were created with);
// the QMP error of a step that failed (the device model keeps reading
// the old chain when the reopen is refused).
func (l *Live) Follow(ctx context.Context, disk string, layers []Layer) error {
	if len(layers) == 0 {
		return fmt.Errorf("%w: disk %s: no chain to follow", ErrChainMismatch, disk)
	}
	want := make([]string, len(layers))
	for i, ly := range layers {
		want[i] = ly.Path
	}
	return l.with(ctx, func(m *qmp.Monitor) error {
		chains, err := Chains(ctx, m)
		if err != nil {
			return err
		}
		mismatch := &MismatchError{Disk: disk, OnDisk: want}
		c, err := chainOf(chains, want[0])
		if err != nil {
			return fmt.Errorf("%w: no disk of the device model reads %s", mismatch, want[0])
		}
		mismatch.DeviceModel = c.Files
		if slices.Equal(cleanAll(c.Files), cleanAll(want)) {
			return nil
		}
		if c.Files[0] != want[0] {
			// The device model writes another image (a snapshot taken
			// on it behind xlsnap's back): the definition, not the
			// device model, would have to follow.
			return fmt.Errorf("%w: the device model writes %s, not %s", mismatch, c.Files[0], want[0])
		}
		if strings.HasPrefix(c.Node, "#") {
			return fmt.Errorf("%w: the node of %s has no name of its own (%s, a -drive disk), so it cannot be reopened on another chain", mismatch, want[0], c.Node)
		}
		nodes, err := namedNodes(ctx, m)
		if err != nil {
			return err
		}
		top, file, err := topNodes(nodes, c.Node, want[0])
		if err != nil {
			return fmt.Errorf("%w: %v", mismatch, err)
		}
		// Bottom up, so each new node is added on the one below it.
		names := make([]string, len(layers))
		for j := len(layers) - 1; j >= 1; j-- {
			names[j] = nodeName(layers[j].Path)
			// The file node inherits read-only: set on it, it would stay
			// so when change-backing-file reopens the node to write.
			opts := map[string]any{"driver": layers[j].Format, "node-name": names[j], "read-only": true,
				"file": map[string]any{"driver": "file", "filename": layers[j].Path}}
			if layers[j].Format != "raw" {
				opts["backing"] = nil // the base: its header may not add one
				if j+1 < len(layers) {
					opts["backing"] = names[j+1]
				}
			}
			addCache(opts, top)
			if err := m.Execute(ctx, "blockdev-add", opts, nil); err != nil {
				// The nodes added so far read nothing yet: closed, each
				// before the one it is backed by.
				for _, n := range names[j+1:] {
					_ = m.Execute(ctx, "blockdev-del", map[string]any{"node-name": n}, nil)
				}
				return fmt.Errorf("opening %s for disk %s: %w", layers[j].Path, disk, err)
			}
		}
		reopen := map[string]any{"driver": layers[0].Format, "node-name": top.Node, "file": file, "read-only": top.ReadOnly}
		if len(layers) > 1 {
			reopen["backing"] = names[1]
		} else {
			reopen["backing"] = nil
		}
		if top.DetectZeroes != "" {
			reopen["detect-zeroes"] = top.DetectZeroes
		}
		addCache(reopen, top)
		l.changed() // no event tells a kept query-block of a reopen
		if err := m.Execute(ctx, "blockdev-reopen", map[string]any{"options": []any{reopen}}, nil); err != nil {
			// The new nodes hold nothing; the disk reads its old chain.
			for _, n := range names[1:] {
				_ = m.Execute(ctx, "blockdev-del", map[string]any{"node-name": n}, nil)
			}
			return fmt.Errorf("switching disk %s to %v: %w", disk, want, err)
		}
		// The headers: the active layer's, then each new node's, where
		// one names another file than the one under it now.
		names[0] = top.Node
		for j := 0; j+1 < len(layers); j++ {
			if err := changeBacking(ctx, m, c.Node, names[j], layers, j); err != nil {
				return err
			}
		}
		if err := flushNode(ctx, m, top.Node, want[0]); err != nil {
			return err
		}
		closeOld(ctx, m, nodes, c.Files[1:], append(names, file))
		after, err := Chains(ctx, m)
		if err != nil {
			return err
		}
		for _, a := range after {
			if a.Node == c.Node {
				if !slices.Equal(cleanAll(a.Files), cleanAll(want)) {
					return fmt.Errorf("%w: after the switch", &MismatchError{Disk: disk, DeviceModel: a.Files, OnDisk: want})
				}
				return nil
			}
		}
		return fmt.Errorf("%w: the disk's node %s is gone after the switch", mismatch, c.Node)
	})
}

// closeOld closes the nodes of the old backing files that the switch
// left without a parent: a node added by the monitor (-blockdev,
// blockdev-add) is the monitor's until blockdev-del, and would hold a
// removed file's space and its storage busy until QEMU exits. Format
// nodes go before the protocol nodes under them. QEMU refuses a node
// something still uses (another disk, a job), which is then kept.
func closeOld(ctx context.Context, m *qmp.Monitor, nodes []blockNode, files []string, keep []string) {
	var format, protocol []string
	for _, f := range files { // top down: each before the one it reads
		for _, n := range nodes {
			if n.File != f || slices.Contains(keep, n.Node) || strings.HasPrefix(n.Node, "#") {
				continue
			}
			if n.Drv == "file" || n.Drv == "host_device" {
				protocol = append(protocol, n.Node)
			} else {
				format = append(format, n.Node)
			}
		}
	}
	for _, n := range append(format, protocol...) {
		_ = m.Execute(ctx, "blockdev-del", map[string]any{"node-name": n}, nil)
	}
}

// topNodes finds the active layer's format node and the name of its
// protocol node (its "file" child, which a reopen must name again).
func topNodes(nodes []blockNode, node, path string) (blockNode, string, error) {
	var top *blockNode
	var files []string
	for i, n := range nodes {
		switch {
		case n.Node == node:
			top = &nodes[i]
		case n.File == path && (n.Drv == "file" || n.Drv == "host_device"):
			files = append(files, n.Node)
		}
	}
	if top == nil {
		return blockNode{}, "", fmt.Errorf("no node %s", node)
	}
	if len(files) != 1 {
		return blockNode{}, "", fmt.Errorf("%d protocol nodes on %s, want one", len(files), path)
	}
	return *top, files[0], nil
}

// addCache carries the active layer's cache mode to a node's options:
// a reopen resets what it does not repeat.
func addCache(opts map[string]any, top blockNode) {
	if top.Cache != nil {
		opts["cache"] = map[string]any{"direct": top.Cache.Direct, "no-flush": top.Cache.NoFlush}
	}
}

// changeBacking writes into the header of the image of node (layer j)
// the path of the layer under it, where the header names another file
// (read from the file: QEMU reports the node's backing, not the header).
// Writing only then spares a layer other readers may share a reopen for
// writing.
func changeBacking(ctx context.Context, m *qmp.Monitor, device, node string, layers []Layer, j int) error {
	if layers[j].Format != "qcow2" {
		return nil
	}
	f, err := os.Open(layers[j].Path)
	if err != nil {
		return fmt.Errorf("reading the header of %s: %w", layers[j].Path, err)
	}
	h, err := chain.ParseHeader(f)
	f.Close()
	if err != nil {
		return fmt.Errorf("reading the header of %s: %w", layers[j].Path, err)
	}
	if h.BackingFile != "" && filepath.Clean(chain.ResolveBacking(layers[j].Path, h.BackingFile)) == filepath.Clean(layers[j+1].Path) {
		return nil
	}
	err = m.Execute(ctx, "change-backing-file", map[string]any{"device": device, "image-node-name": node, "backing-file": layers[j+1].Path}, nil)
	if err != nil {
		return fmt.Errorf("recording %s as the backing file of %s: %w", layers[j+1].Path, layers[j].Path, err)
	}
	return nil
}

// Verify checks that the device model reads, for each disk, exactly the
// chain given (top to base, keyed by the disk's target): what every live
// operation ends with, so a chain the device model and storage's record
// disagree on is loud at once. Errors: a *MismatchError (9) naming the
// first disk that differs; QMP's own.
func (l *Live) Verify(ctx context.Context, want map[string][]string) error {
	var chains []DiskChain
	err := l.with(ctx, func(m *qmp.Monitor) error {
		var err error
		chains, err = Chains(ctx, m) // asked afresh, never the kept answer
		return err
	})
	if err != nil {
		return err
	}
	targets := make([]string, 0, len(want))
	for t := range want {
		targets = append(targets, t)
	}
	slices.Sort(targets)
	for _, t := range targets {
		files := want[t]
		if len(files) == 0 {
			continue
		}
		c, err := chainOf(chains, files[0])
		if err != nil {
			return fmt.Errorf("%w: no disk of the device model reads %s", &MismatchError{Disk: t, OnDisk: files}, files[0])
		}
		if !slices.Equal(cleanAll(c.Files), cleanAll(files)) {
			return &MismatchError{Disk: t, DeviceModel: c.Files, OnDisk: files}
		}
	}
	return nil
}

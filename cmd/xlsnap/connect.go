package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/xenlight"
	"github.com/xlsnap/xlsnap/xenlight/qemu"
)

// companionName is the full build of xlsnap (with cgo, so with libvirt)
// that make build puts beside the lean bin/xlsnap, which hands it libvirt
// URIs (connect_companion.go).
const companionName = "xlsnap-libvirt"

// globals are the options every command shares, as virsh's.
type globals struct {
	connect  string
	stateDir string
	pools    []string
	json     bool
	meta     metadataOptions
}

func (g *globals) register(root *cobra.Command) {
	f := root.PersistentFlags()
	f.StringVarP(&g.connect, "connect", "c", os.Getenv("XLSNAP_DEFAULT_URI"),
		"domain source: file:///DIR (a folder of NAME.xml) or a libvirt URI such as test:///default (default: file:// of the working folder)")
	f.StringVar(&g.stateDir, "state-dir", defaultStateDir(), "folder of xlsnap's metadata and locks")
	f.StringArrayVar(&g.pools, "pool", nil, "folder images may live in, DIR[,max-depth=N] (repeatable; default: the folders of the domains' disks); max-depth is the most layers a disk's chain may have there (default 30)")
	f.BoolVar(&g.json, "json", false, "print data as JSON")
	g.registerMetadata(f)
}

// defaultStateDir follows the XDG base directory rules.
func defaultStateDir() string {
	if d := os.Getenv("XDG_DATA_HOME"); d != "" {
		return filepath.Join(d, "xlsnap")
	}
	if home, err := os.UserHomeDir(); err == nil {
		return filepath.Join(home, ".local", "share", "xlsnap")
	}
	return "xlsnap-state"
}

// source opens the domain source the --connect URI names, and the
// hypervisor back end for its active domains: for a folder, a domain is
// active when a device model answers at NAME.qmp beside NAME.xml; for a
// libvirt URI, libvirt says and drives it.
func (g *globals) source() (driver.DomainSource, xenlight.Hypervisor, func(), error) {
	uri := g.connect
	if uri == "" {
		wd, err := os.Getwd()
		if err != nil {
			return nil, nil, nil, err
		}
		uri = "file://" + wd
	}
	u, err := url.Parse(uri)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: --connect %q: %w", driver.ErrInvalidArg, uri, err)
	}
	if u.Scheme == "file" {
		// file:///DIR only: "file://dir" names a host, "file:dir" a path
		// relative to wherever the command happens to run.
		if u.Opaque != "" || (u.Host != "" && u.Host != "localhost") || !filepath.IsAbs(u.Path) {
			return nil, nil, nil, fmt.Errorf("%w: --connect %q: a folder URI is file:// and an absolute path (file:///DIR)", driver.ErrInvalidArg, uri)
		}
		src, err := driver.NewDirSource(u.Path)
		if err != nil {
			return nil, nil, nil, err
		}
		h := qemu.New(func(domain string) string { return filepath.Join(src.Dir(), domain+".qmp") })
		return src, h, func() {}, nil
	}
	// Whether this binary holds libvirt is a build choice
	// (connect_libvirt.go, connect_companion.go).
	return openLibvirt(uri)
}

// open opens the driver for one command.
func (g *globals) open(ctx context.Context) (*driver.Driver, func(), error) {
	src, h, closeSrc, err := g.source()
	if err != nil {
		return nil, nil, err
	}
	cfg, err := g.driverConfig(src, h)
	if err == nil {
		cfg.Host = g.meta.host
		cfg.Store, err = g.openStore(ctx)
	}
	if err != nil {
		closeSrc()
		return nil, nil, err
	}
	d, err := driver.Open(ctx, cfg)
	if err != nil {
		closeSrc()
		if errors.Is(err, driver.ErrDamaged) {
			err = fmt.Errorf("%w (xlsnap check --restore puts back the copy kept after the last operation)", err)
		}
		return nil, nil, err
	}
	return d, func() { d.Close(); closeSrc() }, nil
}

// withDriver wraps a command body that needs the driver.
func (g *globals) withDriver(fn func(cmd *cobra.Command, d *driver.Driver, args []string) error) func(*cobra.Command, []string) error {
	return func(cmd *cobra.Command, args []string) error {
		d, done, err := g.open(cmd.Context())
		if err != nil {
			return err
		}
		defer done()
		if err := fn(cmd, d, args); err != nil {
			return err
		}
		// A read answers while an operation waits in the journal, and
		// says so.
		if readsSnapshots[cmd.Name()] && len(args) > 0 {
			notes, _ := d.Pending(cmd.Context(), args[0])
			for _, n := range notes {
				fmt.Fprintf(cmd.ErrOrStderr(), "note: %s\n", n)
			}
		}
		return nil
	}
}

// readsSnapshots are the commands that read a domain's snapshots.
var readsSnapshots = map[string]bool{"snapshot-list": true, "snapshot-info": true, "snapshot-dumpxml": true,
	"snapshot-current": true, "snapshot-parent": true}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// driverConfig is the driver's configuration the options give.
func (g *globals) driverConfig(src driver.DomainSource, h xenlight.Hypervisor) (driver.Config, error) {
	cfg := driver.Config{StateDir: g.stateDir, Source: src, Hypervisor: h}
	var err error
	cfg.Pools, cfg.PoolMaxDepth, err = parsePools(g.pools)
	return cfg, err
}

// parsePools reads --pool values, DIR[,max-depth=N]: the folders, and
// the depth limits set (by folder). Only a trailing ",max-depth=N" is an
// option: a folder's name may hold commas.
func parsePools(specs []string) ([]string, map[string]int, error) {
	var pools []string
	depths := map[string]int{}
	const opt = ",max-depth="
	for _, spec := range specs {
		dir := spec
		if i := strings.LastIndex(spec, opt); i >= 0 {
			dir = spec[:i]
			n, err := strconv.Atoi(spec[i+len(opt):])
			if err != nil || n < 1 {
				return nil, nil, usagef("--pool %q: max-depth wants a number of layers, at least 1", spec)
			}
			depths[dir] = n
		}
		if dir == "" {
			return nil, nil, usagef("--pool %q: no folder", spec)
		}
		pools = append(pools, dir)
	}
	return pools, depths, nil
}

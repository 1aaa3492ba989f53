package main

import (
	"errors"
	"fmt"
	"log"
	"net"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/serve"
)

// serveCmd is `xlsnap serve`: libvirt's remote protocol on a Unix socket,
// so stock virsh and libvirt bindings take xlsnap's snapshots.
func (a *app) serveCmd() *cobra.Command {
	var sock, sockRO, upstream string
	cmd := &cobra.Command{
		Use:   "serve --socket PATH [--socket-ro PATH] [--upstream PATH]",
		Short: "Serve libvirt's remote protocol: snapshots for stock virsh and libvirt bindings",
		Long: `Listen on a Unix socket and speak libvirt's remote RPC protocol. The domain
snapshot procedures are answered from xlsnap's driver over the --connect
source; the domain calls virsh and libvirt bindings make around them (lookup,
list, state, info, XML, define) are answered from the source.

  virsh -c 'xen+unix:///system?socket=PATH' snapshot-list web --tree

The socket is the service user's only (mode 0600), and each client's peer
credentials (SO_PEERCRED) are checked against the same rule. --socket-ro is a
read-only socket anyone may use (mode 0777, as libvirtd's): every call that
changes something is refused with VIR_ERR_OPERATION_DENIED.

With --upstream (a libvirtd, virtxend or virtqemud socket) every other call,
its replies, events and streams are relayed unchanged to that daemon, and the
sockets mirror the owner, group and mode of the daemon's (PATH and PATH-ro);
--connect should then name the same daemon, e.g.
  --connect 'xen+unix:///system?socket=/run/libvirt/virtxend-sock'

Logs go to stderr; SIGINT or SIGTERM stops it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if sock == "" && sockRO == "" {
				return usagef("serve needs --socket or --socket-ro")
			}
			ctx := cmd.Context()
			src, h, closeSrc, err := a.source()
			if err != nil {
				return err
			}
			defer closeSrc()
			dcfg, err := a.driverConfig(src, h)
			if err != nil {
				return err
			}
			if dcfg.Store, err = a.openStore(ctx); err != nil {
				return err
			}
			dcfg.Host = a.meta.host
			d, err := driver.Open(ctx, dcfg)
			if err != nil {
				return err
			}
			defer d.Close()
			logger := log.New(cmd.ErrOrStderr(), "xlsnap serve: ", log.LstdFlags)
			cfg := serve.Config{Driver: d, Source: src, Hypervisor: h, Logf: logger.Printf}
			// Over a folder the read-write socket is the service user's
			// only and the read-only one anyone's, as libvirtd's
			// defaults; in front of a daemon each mirrors the daemon's
			// socket it relays to (libvirt names the read-only one
			// PATH-ro).
			access, accessRO := serve.OwnerOnly(), serve.Everyone()
			if upstream != "" {
				cfg.Upstream = upstream
				if access, err = serve.AccessOf(upstream); err != nil {
					return fmt.Errorf("upstream: %w", err)
				}
				if sockRO != "" {
					cfg.UpstreamRO = upstream + "-ro"
					if accessRO, err = serve.AccessOf(cfg.UpstreamRO); err != nil {
						return fmt.Errorf("upstream read-only socket: %w", err)
					}
				}
			}
			srv := serve.New(cfg)
			defer srv.Close()
			errc := make(chan error, 2)
			for _, s := range []struct {
				path   string
				ro     bool
				access serve.Access
			}{{sock, false, access}, {sockRO, true, accessRO}} {
				if s.path == "" {
					continue
				}
				l, err := serve.Listen(s.path, s.access)
				if err != nil {
					return err
				}
				defer l.Close()
				logger.Printf("listening on %s (read-only %v) for %s", s.path, s.ro, src.URI())
				go func() { errc <- srv.Serve(l, s.ro, serve.PeerCheck(s.access)) }()
			}
			select {
			case <-ctx.Done():
				logger.Printf("stopping")
				return nil
			case err := <-errc:
				if errors.Is(err, net.ErrClosed) {
					return nil
				}
				return fmt.Errorf("serving: %w", err)
			}
		},
	}
	f := cmd.Flags()
	f.StringVar(&sock, "socket", "", "read-write Unix socket to listen on")
	f.StringVar(&sockRO, "socket-ro", "", "read-only Unix socket to listen on")
	f.StringVar(&upstream, "upstream", "", "socket of a libvirt daemon to relay every other call to (its PATH-ro serves --socket-ro); --connect should name the same daemon")
	return cmd
}

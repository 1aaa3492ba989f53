package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/xlsnap/xlsnap/driver"
)

// eventJSON is one event as events --json prints it, one object a line.
type eventJSON struct {
	Event    string   `json:"event"`
	Time     string   `json:"time"`
	Domain   string   `json:"domain"`
	Disk     string   `json:"disk"`
	Reason   string   `json:"reason"`
	Snapshot string   `json:"snapshot,omitempty"`
	Host     string   `json:"host,omitempty"`
	Before   []string `json:"before"`
	After    []string `json:"after"`
}

// eventsCmd is virsh's event for xlsnap's one event, a disk's chain
// changed: by a snapshot taken, reverted to or deleted, or a rescan, in
// this process or any other using the same metadata (the state folder's
// processes, or every host of an etcd cluster).
func (a *app) eventsCmd() *cobra.Command {
	var domain string
	var loop, timestamp bool
	var timeout int
	cmd := &cobra.Command{
		Use:   "events [--domain DOMAIN] [--loop] [--timeout SECONDS] [--timestamp]",
		Short: "Wait for chain changes (snapshots taken, reverted, deleted) from any process or host",
		Long: `Wait for a disk's chain to change, as virsh event waits for domain events:
by a snapshot taken, reverted to or deleted, or a chain rescanned, made by any
process using the same metadata: every process of this --state-dir, or, with
--metadata-store etcd://..., every host of the cluster. Without --loop it returns
after the first event; --timeout stops waiting after SECONDS. It ends with
"events received: N" (not under --json, which prints one object a line).`,
		Args: cobra.NoArgs,
		RunE: a.withDriver(func(cmd *cobra.Command, d *driver.Driver, _ []string) error {
			ctx := cmd.Context()
			if timeout < 0 {
				return usagef("timeout must be positive")
			}
			if timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, time.Duration(timeout)*time.Second)
				defer cancel()
			}
			events, err := d.Subscribe(ctx)
			if err != nil {
				return err
			}
			fmt.Fprintln(cmd.ErrOrStderr(), "note: waiting for events")
			w := cmd.OutOrStdout()
			n := 0
			for ev := range events {
				if domain != "" && ev.Domain != domain {
					continue
				}
				n++
				now := time.Now()
				if a.json {
					if err := writeJSONLine(w, eventJSON{Event: "chain-changed", Time: now.UTC().Format(time.RFC3339Nano), Domain: ev.Domain,
						Disk: ev.Disk, Reason: string(ev.Reason), Snapshot: ev.Snapshot, Host: ev.Host, Before: ev.Before, After: ev.After}); err != nil {
						return err
					}
				} else {
					if timestamp {
						fmt.Fprintf(w, "%s: ", now.Format("2006-01-02 15:04:05.000-0700"))
					}
					fmt.Fprintln(w, describeEvent(ev))
				}
				if !loop {
					break
				}
			}
			if !a.json {
				fmt.Fprintf(w, "events received: %d\n", n)
			}
			return nil
		}),
	}
	cmd.Flags().StringVar(&domain, "domain", "", "only events of this domain")
	cmd.Flags().BoolVar(&loop, "loop", false, "keep waiting after the first event")
	cmd.Flags().IntVar(&timeout, "timeout", 0, "stop after SECONDS")
	cmd.Flags().BoolVar(&timestamp, "timestamp", false, "print the time of each event")
	return cmd
}

// describeEvent words an event in virsh event's manner:
// event 'chain-changed' for domain 'vm': vda, snapshot s1 (snapshot) on host h2: top <- ... <- base
func describeEvent(ev driver.ChainEvent) string {
	var b strings.Builder
	fmt.Fprintf(&b, "event 'chain-changed' for domain '%s': %s, ", ev.Domain, ev.Disk)
	if ev.Snapshot != "" {
		fmt.Fprintf(&b, "snapshot %s (%s)", ev.Snapshot, ev.Reason)
	} else {
		b.WriteString(string(ev.Reason))
	}
	if ev.Host != "" {
		fmt.Fprintf(&b, " on host %s", ev.Host)
	}
	fmt.Fprintf(&b, ": %s", strings.Join(ev.After, " <- "))
	return b.String()
}

// writeJSONLine writes v as one line of JSON.
func writeJSONLine(w io.Writer, v any) error {
	return json.NewEncoder(w).Encode(v)
}

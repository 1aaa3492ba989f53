package driver

import (
	"context"
	"fmt"
	"slices"
)

// ChainReason says which operation changed a chain.
type ChainReason string

const (
	ReasonSnapshot ChainReason = "snapshot" // a snapshot was taken: a new overlay on top
	ReasonRevert   ChainReason = "revert"   // a revert put the disk on the snapshot's images
	ReasonDelete   ChainReason = "delete"   // a delete merged images out of the chain
	// ReasonRescan: a chain edited outside xlsnap was rescanned, by
	// ChainChanged or because a call found the definition naming another
	// image (the operator's change, adopted).
	ReasonRescan ChainReason = "rescan"
)

// ChainEvent tells that one disk's backing chain changed.
type ChainEvent struct {
	Domain string
	// Disk is the disk's target (xvda).
	Disk string
	// Before and After are the chain's images, top (the active layer)
	// to base; Before is empty for a disk the domain did not have.
	Before []string
	After  []string
	Reason ChainReason
	// Snapshot is the snapshot taken, reverted to or deleted; "" for a
	// rescan and for a snapshot taken with CreateNoMetadata.
	Snapshot string
	// Host is the host whose operation changed the chain, for an event
	// of another process (through the metadata store: the events file of
	// the embedded store, an etcd watch of a cluster's); "" for this
	// driver's own.
	Host string `json:",omitempty"`
}

// Subscribe returns a ChainEvent for every change of a disk's chain from
// now on, of every domain, in the order the operations committed (a
// rescan that finds the chain as recorded tells nothing), made by this
// driver or (through the metadata store) by any other process on this
// host or, with a cluster store, on any host of the cluster. An operation never waits for a
// subscriber: events queue for a slow one without bound. The channel is
// closed when ctx ends or the driver closes. libvirt has no such event
// (its block job events are per job); this is the hook a toolstack
// watches to keep its own view of the images, where it would otherwise
// poll domblklist.
//
// Errors: the error of a ctx already ended (VIR_ERR_OPERATION_ABORTED 78
// for a cancelled one, VIR_ERR_OPERATION_TIMEOUT 68 for an expired one);
// ErrOperationInvalid (VIR_ERR_OPERATION_INVALID, 55) after Close.
func (d *Driver) Subscribe(ctx context.Context) (<-chan ChainEvent, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if d.closed.Load() {
		return nil, fmt.Errorf("%w: the driver is closed", ErrOperationInvalid)
	}
	// storage's channel is fed from a queue of its own, so this
	// goroutine waiting for a slow reader never holds up an operation.
	in, stop := d.st.Subscribe()
	out := make(chan ChainEvent)
	go func() {
		defer close(out)
		defer stop()
		for {
			select {
			case <-ctx.Done():
				return
			case ev, ok := <-in:
				if !ok {
					return // the driver closed
				}
				// storage tells every rescan, also one that found
				// the chain a call's sync had already adopted (and
				// told of); an event here means a change.
				if slices.Equal(ev.Before, ev.After) {
					continue
				}
				select {
				case out <- ChainEvent{Domain: ev.Domain, Disk: ev.Disk, Before: ev.Before, After: ev.After,
					Reason: ChainReason(ev.Reason), Snapshot: ev.Snapshot, Host: ev.Host}:
				case <-ctx.Done():
					return
				}
			}
		}
	}()
	return out, nil
}

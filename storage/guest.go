package storage

import (
	"context"
	"fmt"

	"github.com/xlsnap/xlsnap/internal/crashpoint"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// Guest is what an operation does to an active domain (see
// metastore.Guest): the journal record of its hypervisor steps.
type Guest = metastore.Guest

// GuestRecord is a journaled set of hypervisor steps not yet ended.
type GuestRecord struct {
	ID     string
	Domain string // the domain's key
	Op     string
	Guest  Guest
}

// GuestBegin journals an operation's hypervisor steps, durably, before
// the first of them: a crash anywhere after leaves a record the driver
// finishes (GuestPending). It returns the record's id for GuestEnd.
func (m *Manager) GuestBegin(ctx context.Context, domain, op string, g Guest) (string, error) {
	in := newIntent(domain, "guest-"+op)
	in.Guest = &g
	if err := m.store.Update(ctx, func(tx metastore.Tx) error { return tx.PutIntent(in) }); err != nil {
		return "", err
	}
	crashpoint.Hit(in.Op + "/begun")
	return in.ID, nil
}

// GuestEnd clears a record once the domain is back as the operation
// leaves it.
func (m *Manager) GuestEnd(ctx context.Context, id string) error {
	return m.store.Update(ctx, func(tx metastore.Tx) error { return tx.DeleteIntent(id) })
}

// GuestPending lists the hypervisor steps journaled for a domain (all
// of this source's domains when domain is "") that no GuestEnd cleared.
func (m *Manager) GuestPending(ctx context.Context, domain string) ([]GuestRecord, error) {
	intents, err := m.intents(ctx, domain)
	if err != nil {
		return nil, err
	}
	var out []GuestRecord
	for _, in := range intents {
		if in.Guest != nil && m.mine(in.Domain) {
			out = append(out, GuestRecord{ID: in.ID, Domain: in.Domain, Op: in.Op, Guest: *in.Guest})
		}
	}
	return out, nil
}

// MemoryHeld reports whether a snapshot record of any domain names path
// as its memory image.
func (m *Manager) MemoryHeld(ctx context.Context, path string) (bool, error) {
	held := false
	err := m.store.View(ctx, func(tx metastore.Tx) error {
		_, snaps, err := allRecords(tx, true)
		for _, list := range snaps {
			for _, s := range list {
				held = held || s.Memory == path
			}
		}
		return err
	})
	return held, err
}

// Pending describes the operations the journal holds for a domain, one
// line each: what reads report while they wait.
func (m *Manager) Pending(ctx context.Context, domain string) ([]string, error) {
	intents, err := m.intents(ctx, domain)
	var out []string
	for _, in := range intents {
		hint := "check lists it; check --repair finishes or sets it aside"
		if in.Live && !in.Committed {
			hint = pendingHint(in)
		}
		out = append(out, fmt.Sprintf("%s %s is pending (%s)", in.Op, in.ID, hint))
	}
	return out, err
}

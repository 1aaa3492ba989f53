package serve

import (
	"context"
	"errors"
	"fmt"

	libvirt "github.com/digitalocean/go-libvirt"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/errdefs"
)

// snapshotHandlers are the DOMAIN_SNAPSHOT_* procedures, each one driver
// call; flags go through unchanged (they carry libvirt's values) and the
// driver checks them as libvirt does.
func snapshotHandlers() map[uint32]handler {
	return map[uint32]handler{
		procDomainSnapshotCreateXML: {changes: "virDomainSnapshotCreateXML", decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotCreateXMLArgs) (any, error) {
			s, err := c.s.cfg.Driver.SnapshotCreateXML(ctx, a.Dom.Name, a.XMLDesc, driver.CreateFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Dom.Name, "")
			}
			return &libvirt.DomainSnapshotCreateXMLRet{Snap: libvirt.DomainSnapshot{Name: s.Name, Dom: a.Dom}}, nil
		})},
		procDomainSnapshotGetXMLDesc: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotGetXMLDescArgs) (any, error) {
			// The driver leaves secrets out unless asked; a read-only
			// connection may not ask (virDomainSnapshotGetXMLDesc).
			if driver.XMLFlags(a.Flags)&driver.XMLSecure != 0 && c.isReadOnly() {
				return nil, &Error{Code: errdefs.CodeOperationDenied, Domain: fromDomainSnapshot, Detail: "virDomainSnapshotGetXMLDesc with secure flag"}
			}
			x, err := c.s.cfg.Driver.SnapshotGetXMLDesc(ctx, a.Snap.Dom.Name, a.Snap.Name, driver.XMLFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Snap.Dom.Name, a.Snap.Name)
			}
			return &libvirt.DomainSnapshotGetXMLDescRet{XML: x}, nil
		})},
		procDomainSnapshotNum: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotNumArgs) (any, error) {
			l, err := c.s.cfg.Driver.ListAllSnapshots(ctx, a.Dom.Name, driver.ListFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Dom.Name, "")
			}
			return &libvirt.DomainSnapshotNumRet{Num: int32(len(l))}, nil
		})},
		procDomainSnapshotListNames: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotListNamesArgs) (any, error) {
			if err := checkMaxNames(a.Maxnames); err != nil {
				return nil, err
			}
			l, err := c.s.cfg.Driver.ListAllSnapshots(ctx, a.Dom.Name, driver.ListFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Dom.Name, "")
			}
			return &libvirt.DomainSnapshotListNamesRet{Names: names(l, a.Maxnames)}, nil
		})},
		procDomainSnapshotLookupByName: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotLookupByNameArgs) (any, error) {
			s, err := c.s.cfg.Driver.SnapshotLookupByName(ctx, a.Dom.Name, a.Name, driver.LookupFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Dom.Name, a.Name)
			}
			return &libvirt.DomainSnapshotLookupByNameRet{Snap: libvirt.DomainSnapshot{Name: s.Name, Dom: a.Dom}}, nil
		})},
		procDomainHasCurrentSnapshot: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainHasCurrentSnapshotArgs) (any, error) {
			_, err := c.s.cfg.Driver.SnapshotCurrent(ctx, a.Dom.Name, driver.LookupFlags(a.Flags))
			switch {
			case errors.Is(err, errdefs.ErrNoSnapshot):
				return &libvirt.DomainHasCurrentSnapshotRet{Result: 0}, nil
			case err != nil:
				return nil, lookupError(err, a.Dom.Name, "")
			}
			return &libvirt.DomainHasCurrentSnapshotRet{Result: 1}, nil
		})},
		procDomainSnapshotCurrent: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotCurrentArgs) (any, error) {
			s, err := c.s.cfg.Driver.SnapshotCurrent(ctx, a.Dom.Name, driver.LookupFlags(a.Flags))
			if errors.Is(err, errdefs.ErrNoSnapshot) {
				return nil, &Error{Code: errdefs.CodeNoDomainSnapshot, Domain: fromDomainSnapshot, Detail: "the domain does not have a current snapshot"}
			}
			if err != nil {
				return nil, lookupError(err, a.Dom.Name, "")
			}
			return &libvirt.DomainSnapshotCurrentRet{Snap: libvirt.DomainSnapshot{Name: s.Name, Dom: a.Dom}}, nil
		})},
		procDomainRevertToSnapshot: {changes: "virDomainRevertToSnapshot", decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainRevertToSnapshotArgs) (any, error) {
			err := c.s.cfg.Driver.RevertToSnapshot(ctx, a.Snap.Dom.Name, a.Snap.Name, driver.RevertFlags(a.Flags))
			return nil, lookupError(err, a.Snap.Dom.Name, a.Snap.Name)
		})},
		procDomainSnapshotDelete: {changes: "virDomainSnapshotDelete", decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotDeleteArgs) (any, error) {
			_, err := c.s.cfg.Driver.SnapshotDelete(ctx, a.Snap.Dom.Name, a.Snap.Name, driver.DeleteFlags(a.Flags))
			return nil, lookupError(err, a.Snap.Dom.Name, a.Snap.Name)
		})},
		procDomainSnapshotGetParent: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotGetParentArgs) (any, error) {
			d := c.s.cfg.Driver
			p, err := d.SnapshotGetParent(ctx, a.Snap.Dom.Name, a.Snap.Name, driver.LookupFlags(a.Flags))
			if errors.Is(err, errdefs.ErrNoSnapshot) {
				// A root: libvirt's words, once the snapshot itself is
				// known to exist.
				if _, lerr := d.SnapshotLookupByName(ctx, a.Snap.Dom.Name, a.Snap.Name, 0); lerr == nil {
					return nil, &Error{Code: errdefs.CodeNoDomainSnapshot, Domain: fromDomainSnapshot,
						Detail: fmt.Sprintf("snapshot '%s' does not have a parent", a.Snap.Name)}
				}
			}
			if err != nil {
				return nil, lookupError(err, a.Snap.Dom.Name, a.Snap.Name)
			}
			return &libvirt.DomainSnapshotGetParentRet{Snap: libvirt.DomainSnapshot{Name: p.Name, Dom: a.Snap.Dom}}, nil
		})},
		procDomainSnapshotNumChildren: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotNumChildrenArgs) (any, error) {
			n, err := c.s.cfg.Driver.SnapshotNumChildren(ctx, a.Snap.Dom.Name, a.Snap.Name, driver.ListFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Snap.Dom.Name, a.Snap.Name)
			}
			return &libvirt.DomainSnapshotNumChildrenRet{Num: int32(n)}, nil
		})},
		procDomainSnapshotListChildrenNames: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotListChildrenNamesArgs) (any, error) {
			if err := checkMaxNames(a.Maxnames); err != nil {
				return nil, err
			}
			l, err := c.s.cfg.Driver.SnapshotListAllChildren(ctx, a.Snap.Dom.Name, a.Snap.Name, driver.ListFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Snap.Dom.Name, a.Snap.Name)
			}
			return &libvirt.DomainSnapshotListChildrenNamesRet{Names: names(l, a.Maxnames)}, nil
		})},
		procDomainSnapshotIsCurrent: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotIsCurrentArgs) (any, error) {
			cur, err := c.s.cfg.Driver.SnapshotIsCurrent(ctx, a.Snap.Dom.Name, a.Snap.Name, driver.LookupFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Snap.Dom.Name, a.Snap.Name)
			}
			return &libvirt.DomainSnapshotIsCurrentRet{Current: boolInt(cur)}, nil
		})},
		procDomainSnapshotHasMetadata: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotHasMetadataArgs) (any, error) {
			m, err := c.s.cfg.Driver.SnapshotHasMetadata(ctx, a.Snap.Dom.Name, a.Snap.Name, driver.LookupFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Snap.Dom.Name, a.Snap.Name)
			}
			return &libvirt.DomainSnapshotHasMetadataRet{Metadata: boolInt(m)}, nil
		})},
		procDomainListAllSnapshots: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainListAllSnapshotsArgs) (any, error) {
			l, err := c.s.cfg.Driver.ListAllSnapshots(ctx, a.Dom.Name, driver.ListFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Dom.Name, "")
			}
			ret := &libvirt.DomainListAllSnapshotsRet{Ret: int32(len(l))}
			if a.NeedResults != 0 {
				ret.Snapshots = refs(l, a.Dom)
			}
			return ret, nil
		})},
		procDomainSnapshotListAllChildren: {decode: with(func(ctx context.Context, c *conn, a *libvirt.DomainSnapshotListAllChildrenArgs) (any, error) {
			l, err := c.s.cfg.Driver.SnapshotListAllChildren(ctx, a.Snapshot.Dom.Name, a.Snapshot.Name, driver.ListFlags(a.Flags))
			if err != nil {
				return nil, lookupError(err, a.Snapshot.Dom.Name, a.Snapshot.Name)
			}
			ret := &libvirt.DomainSnapshotListAllChildrenRet{Ret: int32(len(l))}
			if a.NeedResults != 0 {
				ret.Snapshots = refs(l, a.Snapshot.Dom)
			}
			return ret, nil
		})},
	}
}

// lookupError words the driver's not-found failures as libvirt's drivers
// do (the name quoted, the domain left to the caller, who gave it); any
// other error, or nil, is returned as it is.
func lookupError(err error, domain, snapshot string) error {
	switch {
	case errors.Is(err, errdefs.ErrNoDomain):
		return errNoDomain(fmt.Sprintf("name '%s'", domain))
	case errors.Is(err, errdefs.ErrNoSnapshot) && snapshot != "":
		return errNoSnapshot(snapshot)
	}
	return err
}

// checkMaxNames is the remote driver's bound on the old list calls
// (remote_domain_snapshot_list_names_args' maxnames).
func checkMaxNames(n int32) error {
	if n < 0 || n > listMax {
		return &Error{Code: codeRPC, Domain: fromRemote, Detail: fmt.Sprintf("too many remote domain snapshot names: %d > %d", n, listMax)}
	}
	return nil
}

func names(l []*driver.Snapshot, max int32) []string {
	out := []string{}
	for _, s := range l {
		if int32(len(out)) == max {
			break
		}
		out = append(out, s.Name)
	}
	return out
}

func refs(l []*driver.Snapshot, dom libvirt.Domain) []libvirt.DomainSnapshot {
	out := make([]libvirt.DomainSnapshot, len(l))
	for i, s := range l {
		out[i] = libvirt.DomainSnapshot{Name: s.Name, Dom: dom}
	}
	return out
}

func boolInt(b bool) int32 {
	if b {
		return 1
	}
	return 0
}

package driver

import (
	"fmt"

	"github.com/xlsnap/xlsnap/errdefs"
)

// Flags carry libvirt's numeric values, so a toolstack passes its
// virDomainSnapshot* flags through unchanged.

// CreateFlags are virDomainSnapshotCreateFlags.
type CreateFlags uint32

const (
	CreateRedefine   CreateFlags = 1 << 0 // VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE
	CreateCurrent    CreateFlags = 1 << 1 // VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT
	CreateNoMetadata CreateFlags = 1 << 2 // VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
	CreateHalt       CreateFlags = 1 << 3 // VIR_DOMAIN_SNAPSHOT_CREATE_HALT
	CreateDiskOnly   CreateFlags = 1 << 4 // VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
	CreateReuseExt   CreateFlags = 1 << 5 // VIR_DOMAIN_SNAPSHOT_CREATE_REUSE_EXT
	CreateQuiesce    CreateFlags = 1 << 6 // VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE
	CreateAtomic     CreateFlags = 1 << 7 // VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
	CreateLive       CreateFlags = 1 << 8 // VIR_DOMAIN_SNAPSHOT_CREATE_LIVE
	CreateValidate   CreateFlags = 1 << 9 // VIR_DOMAIN_SNAPSHOT_CREATE_VALIDATE
)

// ListFlags are virDomainSnapshotListFlags.
type ListFlags uint32

const (
	ListDescendants ListFlags = 1 << 0  // VIR_DOMAIN_SNAPSHOT_LIST_DESCENDANTS (children calls)
	ListRoots       ListFlags = 1 << 0  // VIR_DOMAIN_SNAPSHOT_LIST_ROOTS (ListAllSnapshots)
	ListMetadata    ListFlags = 1 << 1  // VIR_DOMAIN_SNAPSHOT_LIST_METADATA
	ListLeaves      ListFlags = 1 << 2  // VIR_DOMAIN_SNAPSHOT_LIST_LEAVES
	ListNoLeaves    ListFlags = 1 << 3  // VIR_DOMAIN_SNAPSHOT_LIST_NO_LEAVES
	ListNoMetadata  ListFlags = 1 << 4  // VIR_DOMAIN_SNAPSHOT_LIST_NO_METADATA
	ListInactive    ListFlags = 1 << 5  // VIR_DOMAIN_SNAPSHOT_LIST_INACTIVE
	ListActive      ListFlags = 1 << 6  // VIR_DOMAIN_SNAPSHOT_LIST_ACTIVE
	ListDiskOnly    ListFlags = 1 << 7  // VIR_DOMAIN_SNAPSHOT_LIST_DISK_ONLY
	ListInternal    ListFlags = 1 << 8  // VIR_DOMAIN_SNAPSHOT_LIST_INTERNAL
	ListExternal    ListFlags = 1 << 9  // VIR_DOMAIN_SNAPSHOT_LIST_EXTERNAL
	ListTopological ListFlags = 1 << 10 // VIR_DOMAIN_SNAPSHOT_LIST_TOPOLOGICAL
)

// RevertFlags are virDomainSnapshotRevertFlags.
type RevertFlags uint32

const (
	RevertRunning RevertFlags = 1 << 0 // VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING
	RevertPaused  RevertFlags = 1 << 1 // VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED
	RevertForce   RevertFlags = 1 << 2 // VIR_DOMAIN_SNAPSHOT_REVERT_FORCE
	// RevertResetNVRAM is VIR_DOMAIN_SNAPSHOT_REVERT_RESET_NVRAM, which
	// libvirt 9.0's QEMU driver accepts. xlsnap keeps no NVRAM image for a
	// Xen domain (its firmware variables are not QEMU's file), so there is
	// nothing to reset: the flag is accepted and changes nothing.
	RevertResetNVRAM RevertFlags = 1 << 3
)

// DeleteFlags are virDomainSnapshotDeleteFlags.
type DeleteFlags uint32

const (
	DeleteChildren     DeleteFlags = 1 << 0 // VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN
	DeleteMetadataOnly DeleteFlags = 1 << 1 // VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY
	DeleteChildrenOnly DeleteFlags = 1 << 2 // VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY
)

// LookupFlags are the flags of virDomainSnapshotLookupByName,
// virDomainSnapshotCurrent, virDomainSnapshotGetParent,
// virDomainSnapshotIsCurrent and virDomainSnapshotHasMetadata. libvirt
// defines no bit for any of them yet ("extra flags; not used yet, so
// callers should always pass 0") and refuses every bit; the parameter is
// kept, typed, so bits libvirt adds later need no new signature.
type LookupFlags uint32

// XMLFlags are virDomainSnapshotXMLFlags.
type XMLFlags uint32

// XMLSecure is VIR_DOMAIN_SNAPSHOT_XML_SECURE: the snapshot's domain
// definition keeps its graphics passwords (left out without it).
const XMLSecure XMLFlags = 1 << 0

// The bits each call takes, as libvirt's QEMU driver's virCheckFlags
// lists them (src/qemu/qemu_driver.c, qemu_snapshot.c).
const (
	createKnown = CreateRedefine | CreateCurrent | CreateNoMetadata | CreateHalt | CreateDiskOnly |
		CreateReuseExt | CreateQuiesce | CreateAtomic | CreateLive | CreateValidate
	listFilters = ListLeaves | ListNoLeaves | ListMetadata | ListNoMetadata | ListInactive |
		ListActive | ListDiskOnly | ListInternal | ListExternal
	listKnown   = ListRoots | ListTopological | listFilters
	revertKnown = RevertRunning | RevertPaused | RevertForce | RevertResetNVRAM
	deleteKnown = DeleteChildren | DeleteMetadataOnly | DeleteChildrenOnly
)

// flagNames are libvirt's names of the bits that take part in its
// exclusive and required pairs, for its messages.
var flagNames = map[any]string{
	CreateRedefine:     "VIR_DOMAIN_SNAPSHOT_CREATE_REDEFINE",
	CreateCurrent:      "VIR_DOMAIN_SNAPSHOT_CREATE_CURRENT",
	CreateNoMetadata:   "VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA",
	CreateHalt:         "VIR_DOMAIN_SNAPSHOT_CREATE_HALT",
	CreateDiskOnly:     "VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY",
	CreateQuiesce:      "VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE",
	CreateLive:         "VIR_DOMAIN_SNAPSHOT_CREATE_LIVE",
	RevertRunning:      "VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING",
	RevertPaused:       "VIR_DOMAIN_SNAPSHOT_REVERT_PAUSED",
	DeleteChildren:     "VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN",
	DeleteChildrenOnly: "VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY",
}

// flagBits is any of the call's flag types.
type flagBits interface {
	~uint32
}

// checkFlags is libvirt's virCheckFlags: bits outside known are refused
// with ErrInvalidArg (VIR_ERR_INVALID_ARG), naming them in hex and the
// call, as "unsupported flags (0x100000) in function …".
func checkFlags[F flagBits](call string, flags, known F) error {
	if unknown := flags &^ known; unknown != 0 {
		return invalidArg(fmt.Sprintf("unsupported flags (%#x) in function %s", uint32(unknown), call))
	}
	return nil
}

// exclusive is libvirt's VIR_EXCLUSIVE_FLAGS_RET: a and b together are
// ErrInvalidArg, with libvirt's message.
func exclusive[F flagBits](flags, a, b F) error {
	if flags&a != 0 && flags&b != 0 {
		return invalidArg(fmt.Sprintf("Flags '%s' and '%s' are mutually exclusive", flagNames[a], flagNames[b]))
	}
	return nil
}

// requires is libvirt's VIR_REQUIRE_FLAG_RET: flag without needed is
// ErrInvalidArg, with libvirt's message.
func requires[F flagBits](flags, flag, needed F) error {
	if flags&flag != 0 && flags&needed == 0 {
		return invalidArg(fmt.Sprintf("Flag '%s' is required by flag '%s'", flagNames[needed], flagNames[flag]))
	}
	return nil
}

// flagError is an errdefs.ErrInvalidArg whose text is libvirt's alone:
// libvirt reports its flag checks (virReportInvalidArg) without the
// "invalid argument: " its other VIR_ERR_INVALID_ARG errors start with.
type flagError struct{ msg string }

func invalidArg(msg string) error { return &flagError{msg: msg} }

func (e *flagError) Error() string { return e.msg }
func (e *flagError) Unwrap() error { return errdefs.ErrInvalidArg }

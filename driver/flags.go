package driver

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
)

// DeleteFlags are virDomainSnapshotDeleteFlags.
type DeleteFlags uint32

const (
	DeleteChildren     DeleteFlags = 1 << 0 // VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN
	DeleteMetadataOnly DeleteFlags = 1 << 1 // VIR_DOMAIN_SNAPSHOT_DELETE_METADATA_ONLY
	DeleteChildrenOnly DeleteFlags = 1 << 2 // VIR_DOMAIN_SNAPSHOT_DELETE_CHILDREN_ONLY
)

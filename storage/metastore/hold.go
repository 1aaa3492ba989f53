package metastore

import "time"

// Hold keeps a domain for an edit of one disk's chain made outside
// xlsnap (the toolstack copying, merging or rewriting images): from the
// announcement (driver.ChainChanging) to the rescan that ends it
// (driver.ChainChanged) or Until, whichever comes first. It lives in the
// domain's record, so every process and every host of a shared store
// sees it. A Hold is replaced, never changed in place (Domain.Clone
// shares it).
type Hold struct {
	// ID names this hold (random hex); Disk is the target whose chain
	// is being edited; Host the host that announced it.
	ID   string `json:"id"`
	Disk string `json:"disk"`
	Host string `json:"host,omitempty"`
	// Since and Until are when it was taken and when it lapses, by the
	// clock of Host.
	Since time.Time `json:"since"`
	Until time.Time `json:"until"`
	// Merges are the images the edit merges away (absolute paths): the
	// rescan that ends the hold takes those that left the chain out of
	// the image tree.
	Merges []string `json:"merges,omitempty"`
}

// Expired reports whether the hold has lapsed at now.
func (h *Hold) Expired(now time.Time) bool { return !now.Before(h.Until) }

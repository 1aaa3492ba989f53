package qmp

import "time"

// SetPivotBounds sets the pivot's pause bounds for a test, until the
// returned function puts them back.
func SetPivotBounds(limit, retry time.Duration, tries int) (restore func()) {
	l, r, n := syncLimit, syncRetry, pivotTries
	syncLimit, syncRetry, pivotTries = limit, retry, tries
	return func() { syncLimit, syncRetry, pivotTries = l, r, n }
}

package driver

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/xlsnap/xlsnap/errdefs"
)

// TestLockWaitCancelled: a call whose context ends while another call
// holds its domain fails with the context's error (aborted, 78, or the
// deadline's 68), never ErrBusy, which a caller would retry; the domain
// is free again once the holder is done.
func TestLockWaitCancelled(t *testing.T) {
	d := &Driver{}
	unlock, err := d.lock(context.Background(), "a")
	if err != nil {
		t.Fatal(err)
	}
	cctx, cancel := context.WithCancel(context.Background())
	go func() { time.Sleep(20 * time.Millisecond); cancel() }()
	_, err = d.lock(cctx, "a")
	if !errors.Is(err, context.Canceled) || errors.Is(err, errdefs.ErrBusy) || errdefs.CodeOf(err) != errdefs.CodeOperationAborted {
		t.Fatalf("cancelled wait: %v (code %d), want context.Canceled, code 78, not ErrBusy", err, errdefs.CodeOf(err))
	}
	dctx, cancel2 := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel2()
	if _, err := d.lock(dctx, "a"); !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, errdefs.ErrBusy) {
		t.Fatalf("expired wait: %v, want context.DeadlineExceeded, not ErrBusy", err)
	}
	unlock()
	again, err := d.lock(context.Background(), "a")
	if err != nil {
		t.Fatalf("after release: %v", err)
	}
	again()
}

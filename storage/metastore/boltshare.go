package metastore

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"syscall"
	"time"

	bolt "go.etcd.io/bbolt"
)

var bucketUsers = []byte("users")

// PutUsers replaces what publisher says its domains' disks use, in the
// bucket users. Writing the same list again writes nothing (no fsync).
func (b *Bolt) PutUsers(ctx context.Context, publisher string, uses []ImageUse) error {
	for i := range uses {
		uses[i].Publisher = publisher
	}
	data, err := json.Marshal(uses)
	if err != nil {
		return err
	}
	same := false
	err = b.f.run(ctx, false, func(tx *bolt.Tx) error {
		if bk := tx.Bucket(bucketUsers); bk != nil {
			same = string(bk.Get([]byte(publisher))) == string(data)
		}
		return nil
	})
	if err != nil || same {
		return err
	}
	return b.f.run(ctx, true, func(tx *bolt.Tx) error {
		bk, err := tx.CreateBucketIfNotExists(bucketUsers)
		if err != nil {
			return err
		}
		if len(uses) == 0 {
			return bk.Delete([]byte(publisher))
		}
		return bk.Put([]byte(publisher), data)
	})
}

// Users lists every publisher's image uses, by publisher.
func (b *Bolt) Users(ctx context.Context) ([]ImageUse, error) {
	var out []ImageUse
	err := b.f.run(ctx, false, func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucketUsers)
		if bk == nil {
			return nil
		}
		return bk.ForEach(func(k, v []byte) error {
			var uses []ImageUse
			if err := json.Unmarshal(v, &uses); err != nil {
				return fmt.Errorf("%w: %s: users of %q: decode: %w", ErrDamaged, b.f.path, k, err)
			}
			out = append(out, uses...)
			return nil
		})
	})
	return out, err
}

// The events of one host's processes go through FILE.events beside the
// database: each Publish appends a JSON line (under FILE.events.lock, so
// lines never interleave), and a watcher reads what is appended. Past
// eventsMax bytes the file is renamed to FILE.events.1 and begun anew; a
// watcher still reading the old one finishes it first.
const (
	eventsMax  = 4 << 20
	eventsPoll = 20 * time.Millisecond
)

func (b *Bolt) eventsPath() string { return b.f.path + ".events" }

// Publish appends evs to the events file.
func (b *Bolt) Publish(ctx context.Context, evs ...Event) error {
	if err := ctx.Err(); err != nil || len(evs) == 0 {
		return err
	}
	var buf []byte
	for _, ev := range evs {
		line, err := json.Marshal(ev)
		if err != nil {
			return err
		}
		buf = append(append(buf, line...), '\n')
	}
	path := b.eventsPath()
	unlock, err := lockFile(ctx, path+".lock", true)
	if err != nil {
		return err
	}
	defer unlock()
	if fi, err := os.Stat(path); err == nil && fi.Size()+int64(len(buf)) > eventsMax {
		if err := os.Rename(path, path+".1"); err != nil {
			return err
		}
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return err
	}
	_, err = f.Write(buf)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// Watch tails the events file from its present end.
func (b *Bolt) Watch(ctx context.Context) (<-chan Event, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	path := b.eventsPath()
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if _, err := f.Seek(0, io.SeekEnd); err != nil {
		f.Close()
		return nil, err
	}
	out := make(chan Event)
	go func() {
		defer close(out)
		t := &tail{f: f, r: bufio.NewReader(f)}
		defer func() { t.f.Close() }()
		tick := time.NewTicker(eventsPoll)
		defer tick.Stop()
		for {
			for _, ev := range t.read(path) {
				select {
				case out <- ev:
				case <-ctx.Done():
					return
				}
			}
			select {
			case <-ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	return out, nil
}

// tail reads whole lines appended to one events file, moving on to the
// file's new incarnation once the old one is read to its end.
type tail struct {
	f       *os.File
	r       *bufio.Reader
	partial []byte
}

func (t *tail) read(path string) []Event {
	var out []Event
	for {
		line, err := t.r.ReadBytes('\n')
		t.partial = append(t.partial, line...)
		if err == nil {
			var ev Event
			if json.Unmarshal(t.partial, &ev) == nil {
				out = append(out, ev)
			}
			t.partial = t.partial[:0]
			continue
		}
		// At the end of this file: a renamed one is done once read out.
		if !t.replaced(path) {
			return out
		}
		nf, err := os.Open(path)
		if err != nil {
			return out // not made again yet: the next look finds it
		}
		t.f.Close()
		t.f, t.r, t.partial = nf, bufio.NewReader(nf), t.partial[:0]
	}
}

// replaced reports whether path now names another file than t's.
func (t *tail) replaced(path string) bool {
	var a, b syscall.Stat_t
	if syscall.Fstat(int(t.f.Fd()), &a) != nil || syscall.Stat(path, &b) != nil {
		return false
	}
	return a.Ino != b.Ino || a.Dev != b.Dev
}

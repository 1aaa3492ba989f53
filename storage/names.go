package storage

import (
	"fmt"
	"strings"
	"unicode/utf8"
)

// MaxNameLen is the longest domain or snapshot name, in bytes: names end
// up in file names (overlays, lock files), and a file name holds 255.
const MaxNameLen = 255

// CheckName applies libvirt's rules for a domain or snapshot name, plus
// what keeps it safe inside a file name: not empty, at most MaxNameLen
// bytes, valid UTF-8, no leading '.' (hidden files, "." and ".."), no
// leading '-' (an option to qemu-img), no '/', and no control characters
// (a newline would split a log line or a listing). kind names the thing
// in the error ("domain", "snapshot", "disk").
func CheckName(kind, name string) error {
	bad := func(why string) error {
		return fmt.Errorf("%w: %s name %q: %s", ErrInvalidArg, kind, name, why)
	}
	switch {
	case name == "":
		return fmt.Errorf("%w: empty %s name", ErrInvalidArg, kind)
	case len(name) > MaxNameLen:
		return fmt.Errorf("%w: %s name of %d bytes (at most %d)", ErrInvalidArg, kind, len(name), MaxNameLen)
	case !utf8.ValidString(name):
		return bad("not valid UTF-8")
	case strings.ContainsRune(name, utf8.RuneError):
		// What XML could not carry (a control character, a byte that is
		// not UTF-8) arrives as U+FFFD: the name is not the one typed.
		return bad("contains U+FFFD, the mark of a character that was lost")
	case strings.HasPrefix(name, "."):
		return bad("starts with '.'")
	case strings.HasPrefix(name, "-"):
		return bad("starts with '-'")
	case strings.Contains(name, "/"):
		return bad("contains '/'")
	}
	for _, r := range name {
		if r < 0x20 || r == 0x7f || (r >= 0x80 && r < 0xa0) {
			return bad("contains a control character")
		}
	}
	return nil
}

package storage

import (
	"errors"
	"strings"
	"testing"
)

func TestCheckName(t *testing.T) {
	for _, ok := range []string{"s1", "before-upgrade", "a.b", "ünïcode", "x y", strings.Repeat("a", MaxNameLen), "1700000000"} {
		if err := CheckName("snapshot", ok); err != nil {
			t.Errorf("CheckName(%q): %v", ok, err)
		}
	}
	for _, bad := range []string{"", ".", "..", ".hidden", "-x", "a/b", "/abs", "a\nb", "a\x00b", "tab\there", "del\x7f",
		"c1\u0085", strings.Repeat("a", MaxNameLen+1), "\xff\xfe"} {
		if err := CheckName("snapshot", bad); !errors.Is(err, ErrInvalidArg) {
			t.Errorf("CheckName(%q) = %v, want ErrInvalidArg", bad, err)
		}
	}
}

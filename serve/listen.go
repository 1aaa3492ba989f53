package serve

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Access is who may use a socket, in the file system's terms: the
// socket file's owner, group and permission bits. Connecting to a Unix
// socket needs write permission on it, so the same rule, applied to each
// client's peer credentials, decides who is served.
type Access struct {
	UID, GID int
	Mode     os.FileMode
}

// OwnerOnly is the rule for a socket over a folder source: the user
// running the service (and root) only.
func OwnerOnly() Access {
	return Access{UID: os.Getuid(), GID: os.Getgid(), Mode: 0o600}
}

// Everyone is the rule for a read-only socket over a folder source:
// anyone may connect, as libvirtd's unix_sock_ro_perms default (0777)
// lets anyone reach its read-only socket; what a read-only connection
// may do (list and read, never change) is the server's to limit.
func Everyone() Access {
	return Access{UID: os.Getuid(), GID: os.Getgid(), Mode: 0o777}
}

// AccessOf is the rule of an existing socket (an upstream daemon's), so
// xlsnap's socket in front of it lets in exactly whom the daemon's lets
// in.
//
// Errors: the file system's, reading path.
func AccessOf(path string) (Access, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return Access{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return Access{}, fmt.Errorf("%s: no owner information", path)
	}
	return Access{UID: int(st.Uid), GID: int(st.Gid), Mode: fi.Mode().Perm()}, nil
}

// Allows reports whether a process with uid, primary gid and
// supplementary groups may write to a file with this owner, group and
// mode, as the kernel decides it (root always may).
func (a Access) Allows(uid, gid int, groups []int) bool {
	switch {
	case uid == 0:
		return true
	case uid == a.UID:
		return a.Mode&0o200 != 0
	case gid == a.GID || containsInt(groups, a.GID):
		return a.Mode&0o020 != 0
	}
	return a.Mode&0o002 != 0
}

func containsInt(l []int, v int) bool {
	for _, x := range l {
		if x == v {
			return true
		}
	}
	return false
}

// Listen creates a Unix socket at path with a's owner, group and mode.
// The socket is bound in a private folder beside path and renamed into
// place once its permissions are set, so no one connects in between; a
// stale socket at path (one nothing answers on) is replaced, a live one
// or any other file is not.
//
// Errors: ErrSocketInUse for a path something answers on or that is not
// a socket; the system's creating, changing or renaming the socket
// (changing the owner needs root).
func Listen(path string, a Access) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("%w: %s exists and is not a socket", ErrSocketInUse, path)
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return nil, fmt.Errorf("%w: %s", ErrSocketInUse, path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	tmp, err := os.MkdirTemp(filepath.Dir(path), ".xlsnap-sock-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(tmp)
	bound := filepath.Join(tmp, "s")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: bound, Net: "unix"})
	if err != nil {
		return nil, err
	}
	// The listener is closed by its owner; the name it was bound to no
	// longer exists, so Close must not unlink it, and the final name is
	// removed by the wrapper below.
	l.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		l.Close()
		return nil, err
	}
	if err := os.Chmod(bound, a.Mode); err != nil {
		return fail(err)
	}
	if a.UID != os.Getuid() || a.GID != os.Getgid() {
		if err := os.Lchown(bound, a.UID, a.GID); err != nil {
			return fail(fmt.Errorf("giving %s to %d:%d: %w", path, a.UID, a.GID, err))
		}
	}
	if err := os.Rename(bound, path); err != nil {
		return fail(err)
	}
	return &unlinking{UnixListener: l, path: path}, nil
}

// ErrSocketInUse is a socket path another process serves.
var ErrSocketInUse = errors.New("socket in use")

// unlinking removes the socket file when the listener closes.
type unlinking struct {
	*net.UnixListener
	path string
}

func (u *unlinking) Close() error {
	err := u.UnixListener.Close()
	os.Remove(u.path)
	return err
}

// PeerCheck returns a connection check for Server.Serve: the client's
// SO_PEERCRED (uid, gid, pid) must pass a, with the peer's supplementary
// groups read from /proc/PID/status. A connection whose credentials
// cannot be read is refused.
func PeerCheck(a Access) func(net.Conn) error {
	return func(c net.Conn) error {
		uc, ok := c.(*net.UnixConn)
		if !ok {
			return fmt.Errorf("not a Unix connection")
		}
		raw, err := uc.SyscallConn()
		if err != nil {
			return err
		}
		var cred *unix.Ucred
		var cerr error
		if err := raw.Control(func(fd uintptr) {
			cred, cerr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		}); err != nil {
			return err
		}
		if cerr != nil {
			return fmt.Errorf("reading peer credentials: %w", cerr)
		}
		groups := supplementaryGroups(int(cred.Pid))
		if !a.Allows(int(cred.Uid), int(cred.Gid), groups) {
			return fmt.Errorf("peer uid %d gid %d (pid %d) may not use a socket of %d:%d mode %#o",
				cred.Uid, cred.Gid, cred.Pid, a.UID, a.GID, a.Mode)
		}
		return nil
	}
}

// supplementaryGroups reads a process's groups; nil when it cannot (the
// process is gone), which only ever narrows what the peer may do.
func supplementaryGroups(pid int) []int {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return nil
	}
	for _, line := range strings.Split(string(b), "\n") {
		rest, ok := strings.CutPrefix(line, "Groups:")
		if !ok {
			continue
		}
		var out []int
		for _, f := range strings.Fields(rest) {
			if g, err := strconv.Atoi(f); err == nil {
				out = append(out, g)
			}
		}
		return out
	}
	return nil
}

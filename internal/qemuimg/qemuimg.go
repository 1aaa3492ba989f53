// Package qemuimg runs qemu-img with explicit image formats, cancellable
// contexts, parsed JSON output and typed errors.
package qemuimg

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"github.com/xlsnap/xlsnap/errdefs"
)

// Sentinel errors, each wrapping the errdefs one that gives its libvirt
// code. *Error unwraps to one of them when qemu-img's message is
// recognisable, to errdefs.ErrOperationFailed when not; argument
// validation in this package wraps ErrInvalidArg.
var (
	ErrInvalidArg  = fmt.Errorf("qemuimg: %w", errdefs.ErrInvalidArg)
	ErrNotFound    = fmt.Errorf("qemuimg: file %w", errdefs.ErrNotFound)
	ErrNoSpace     = fmt.Errorf("qemuimg: %w", errdefs.ErrNoSpace)
	ErrLocked      = fmt.Errorf("qemuimg: %w", errdefs.ErrLocked)
	ErrCheckFailed = fmt.Errorf("qemuimg: %w: check found corruptions or leaks", errdefs.ErrInvalidImage)
)

// Runner runs qemu-img. The zero value uses "qemu-img" from $PATH.
type Runner struct {
	Path string
}

// Error is a qemu-img invocation that exited with a non-zero status.
type Error struct {
	Args     []string // arguments after the program name; Args[0] is the subcommand
	ExitCode int      // -1 if killed by a signal
	Stderr   string   // trimmed stderr, qemu-img's own message
}

// maxMessageLines bounds Error() since check can print one line per bad cluster.
const maxMessageLines = 3

func (e *Error) Error() string {
	sub := ""
	if len(e.Args) > 0 {
		sub = " " + e.Args[0]
	}
	msg := "no error output"
	if e.Stderr != "" {
		lines := strings.Split(e.Stderr, "\n")
		if len(lines) > maxMessageLines {
			lines = append(lines[:maxMessageLines], "...")
		}
		msg = strings.Join(lines, "; ")
	}
	return fmt.Sprintf("qemu-img%s: exit status %d: %s", sub, e.ExitCode, msg)
}

// Unwrap maps qemu-img's exit status and message (stable under LC_ALL=C) to
// a sentinel error, or to errdefs.ErrOperationFailed when nothing is
// recognised: qemu-img ran and failed.
func (e *Error) Unwrap() error {
	s := e.Stderr
	switch {
	// check exits 2 on corruptions and 3 on leaks; 1 and 63 mean it could not check.
	case len(e.Args) > 0 && e.Args[0] == "check" && (e.ExitCode == 2 || e.ExitCode == 3):
		return ErrCheckFailed
	case strings.Contains(s, "No such file or directory"):
		return ErrNotFound
	case strings.Contains(s, "No space left on device"):
		return ErrNoSpace
	case strings.Contains(s, "Failed to get") && strings.Contains(s, "lock"):
		return ErrLocked
	case strings.Contains(s, "Unknown file format"),
		strings.Contains(s, "does not accept value"),
		strings.Contains(s, "Invalid parameter"),
		strings.Contains(s, "unrecognized option"),
		strings.Contains(s, "invalid option"):
		return ErrInvalidArg
	}
	return errdefs.ErrOperationFailed
}

// run executes qemu-img with args and returns its stdout. With a non-nil
// progress, stdout is parsed for -p progress lines instead of being returned.
// stdout is returned even on failure because check prints JSON when it fails.
func (r *Runner) run(ctx context.Context, args []string, progress func(percent float64)) ([]byte, error) {
	prog := r.Path
	if prog == "" {
		prog = "qemu-img"
	}
	cmd := exec.CommandContext(ctx, prog, args...)
	// Stable, untranslated messages so Unwrap can match them.
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	// qemu-img dies with xlsnap: a killed xlsnap must not leave it
	// writing an image while the next xlsnap recovers that image. The
	// signal follows the thread that started it (Linux), so the thread
	// stays this goroutine's until qemu-img is done.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var stdout, stderr bytes.Buffer
	cmd.Stderr = &stderr

	var err error
	if progress == nil {
		cmd.Stdout = &stdout
		err = cmd.Run()
	} else {
		err = runWithProgress(cmd, progress)
	}
	if err == nil {
		return stdout.Bytes(), nil
	}
	if ctx.Err() != nil {
		return stdout.Bytes(), fmt.Errorf("qemu-img %s: %w", args[0], ctx.Err())
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return stdout.Bytes(), &Error{Args: args, ExitCode: ee.ExitCode(), Stderr: strings.TrimSpace(stderr.String())}
	}
	// qemu-img did not run (not installed, not executable).
	return stdout.Bytes(), fmt.Errorf("%w: qemu-img %s: %w", errdefs.ErrOperationFailed, args[0], err)
}

func runWithProgress(cmd *exec.Cmd, progress func(percent float64)) error {
	pipe, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	sc := bufio.NewScanner(pipe)
	sc.Split(scanCRLF)
	last := -1.0
	for sc.Scan() {
		if p, ok := parseProgress(sc.Text()); ok && p != last {
			last = p
			progress(p)
		}
	}
	// Keep draining if the scanner gave up so qemu-img never blocks on a full pipe.
	_, _ = io.Copy(io.Discard, pipe)
	return cmd.Wait()
}

// scanCRLF splits on '\r' or '\n' because qemu-img redraws progress with '\r'.
func scanCRLF(data []byte, atEOF bool) (int, []byte, error) {
	if i := bytes.IndexAny(data, "\r\n"); i >= 0 {
		return i + 1, data[:i], nil
	}
	if atEOF && len(data) > 0 {
		return len(data), data, nil
	}
	return 0, nil, nil
}

// parseProgress parses a qemu-img -p line such as "    (12.34/100%)".
func parseProgress(line string) (float64, bool) {
	s := strings.TrimSpace(line)
	s, ok := strings.CutPrefix(s, "(")
	if !ok {
		return 0, false
	}
	s, ok = strings.CutSuffix(s, "/100%)")
	if !ok {
		return 0, false
	}
	p, err := strconv.ParseFloat(s, 64)
	if err != nil {
		return 0, false
	}
	return p, true
}

// validatePath rejects a leading '-' (qemu-img would parse it as an option)
// and ':' (qemu-img may take "proto:..." as a protocol such as nbd: or ssh:).
func validatePath(p string) error {
	switch {
	case p == "":
		return fmt.Errorf("%w: empty path", ErrInvalidArg)
	case strings.HasPrefix(p, "-"):
		return fmt.Errorf("%w: path %q starts with '-'", ErrInvalidArg, p)
	case strings.Contains(p, ":"):
		return fmt.Errorf("%w: path %q contains ':'", ErrInvalidArg, p)
	}
	return nil
}

// validateFormat requires a format (an empty one would let qemu-img probe)
// and keeps it free of ',' and '=' since it is embedded in --image-opts.
func validateFormat(f string) error {
	if f == "" {
		return fmt.Errorf("%w: empty format", ErrInvalidArg)
	}
	for _, c := range f {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return fmt.Errorf("%w: format %q", ErrInvalidArg, f)
		}
	}
	return nil
}

func validate(path, format string) error {
	if err := validatePath(path); err != nil {
		return err
	}
	return validateFormat(format)
}

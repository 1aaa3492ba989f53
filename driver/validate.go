package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"

	"github.com/xlsnap/xlsnap/errdefs"
)

// snapshotSchema is libvirt's own RelaxNG schema of snapshot XML, as
// libvirt installs it; VALIDATE checks against it, as libvirt does.
var snapshotSchema = "/usr/share/libvirt/schemas/domainsnapshot.rng"

// xmllint is libxml2's command, whose RelaxNG validator is the one
// libvirt uses. Running it as a process keeps libxml2 out of xlsnap's
// own start-up, which every command pays.
var xmllint = "xmllint"

// validateSchema checks a snapshot document against libvirt's schema
// (VIR_DOMAIN_SNAPSHOT_CREATE_VALIDATE). An invalid document is
// ErrInvalidSchema (VIR_ERR_XML_INVALID_SCHEMA) with the validator's
// message, as libvirt reports it; a validator or schema that cannot be
// run or read is ErrInternal: VALIDATE fails closed, never skipped.
func validateSchema(ctx context.Context, doc string) error {
	cmd := exec.CommandContext(ctx, xmllint, "--noout", "--relaxng", snapshotSchema, "-")
	cmd.Stdin = strings.NewReader(doc)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err := cmd.Run()
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("validating the snapshot XML: %w", ctx.Err())
	}
	// xmllint's last line says "- fails to validate"; the lines before
	// say why, which is what libvirt reports.
	msg := strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(stderr.String()), "- fails to validate"))
	// xmllint exits 3 for a document the schema refuses; every other
	// failure (no schema, a schema it cannot compile, no xmllint) is the
	// validator's own.
	var exit *exec.ExitError
	if errors.As(err, &exit) && exit.ExitCode() == 3 {
		return fmt.Errorf("%w: Unable to validate doc against %s\n%s", errdefs.ErrInvalidSchema, snapshotSchema, msg)
	}
	if msg != "" {
		err = fmt.Errorf("%w: %s", err, msg)
	}
	return fmt.Errorf("%w: cannot validate the snapshot XML against %s with %s: %w", errdefs.ErrInternal, snapshotSchema, xmllint, err)
}

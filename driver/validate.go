package driver

import (
	"bytes"
	"context"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"regexp"
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
// message without xmllint's location prefixes, as libvirt reports it; a
// validator or schema that cannot be run or read is ErrInternal: VALIDATE
// fails closed, never skipped.
//
// xmllint gets the document without its DOCTYPE and with --nonet: a DTD
// names files and URLs it would read (and quote back in its errors),
// where libvirt validates the document alone and opens nothing. Entity
// references in the body then stay undefined, as the driver's own parser
// refuses them anyway.
func validateSchema(ctx context.Context, doc string) error {
	body, err := withoutDoctype(doc)
	if err != nil {
		return err
	}
	cmd := exec.CommandContext(ctx, xmllint, "--noout", "--nonet", "--relaxng", snapshotSchema, "-")
	cmd.Stdin = strings.NewReader(body)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	if err == nil {
		return nil
	}
	if ctx.Err() != nil {
		return fmt.Errorf("validating the snapshot XML: %w", ctx.Err())
	}
	// xmllint's last line says "- fails to validate"; the lines before
	// say why, which is what libvirt reports.
	msg := strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(stderr.String()), "- fails to validate"))
	msg = xmllintPrefix.ReplaceAllString(msg, "")
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

// xmllintPrefix is what xmllint puts before each of libxml2's messages
// ("-:1: element bogus: Relax-NG validity error : "); libvirt reports the
// message alone.
var xmllintPrefix = regexp.MustCompile(`(?m)^(?:-:\d+: )?(?:element [^:\s]+: )?[A-Za-z -]*(?:error|warning) : `)

// withoutDoctype is doc with every DOCTYPE declaration of its prolog cut
// out, the rest byte for byte. They are found by Go's own tokenizer,
// which reads no DTD; a prolog it cannot read is ErrXMLDetail, as the
// well-formedness check would report it.
func withoutDoctype(doc string) (string, error) {
	dec := xml.NewDecoder(strings.NewReader(doc))
	var out strings.Builder
	kept := int64(0) // doc[:kept] is decided
	for {
		start := dec.InputOffset()
		tok, err := dec.RawToken()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return "", fmt.Errorf("%w: snapshot XML: %w", errdefs.ErrXMLDetail, err)
		}
		if _, ok := tok.(xml.StartElement); ok {
			break // the prolog is over
		}
		if d, ok := tok.(xml.Directive); ok && bytes.HasPrefix(bytes.TrimSpace(d), []byte("DOCTYPE")) {
			out.WriteString(doc[kept:start])
			kept = dec.InputOffset()
		}
	}
	out.WriteString(doc[kept:])
	return out.String(), nil
}

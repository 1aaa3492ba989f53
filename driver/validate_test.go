package driver

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
)

// TestValidateSchema: VALIDATE is libxml2's RelaxNG validator over
// libvirt's own schema. An invalid document is ErrInvalidSchema (92) with
// the validator's reason; a validator or schema that is not there fails
// closed (ErrInternal), never passes; a cancelled context stops it.
func TestValidateSchema(t *testing.T) {
	ctx := context.Background()
	if err := validateSchema(ctx, "<domainsnapshot><name>v1</name></domainsnapshot>"); err != nil {
		t.Fatalf("a valid document: %v", err)
	}
	err := validateSchema(ctx, "<domainsnapshot><name>v1</name><bogus/></domainsnapshot>")
	if !errors.Is(err, errdefs.ErrInvalidSchema) || errdefs.CodeOf(err) != errdefs.CodeXMLInvalidSchema ||
		!strings.Contains(err.Error(), "Element domainsnapshot has extra content: bogus") {
		t.Fatalf("<bogus/>: %v (code %d)", err, errdefs.CodeOf(err))
	}
	for what, set := range map[string]func(){
		"no schema":  func() { snapshotSchema = filepath.Join(t.TempDir(), "none.rng") },
		"no xmllint": func() { xmllint = filepath.Join(t.TempDir(), "xmllint") },
	} {
		t.Run(what, func(t *testing.T) {
			schema, lint := snapshotSchema, xmllint
			defer func() { snapshotSchema, xmllint = schema, lint }()
			set()
			err := validateSchema(ctx, "<domainsnapshot><name>v1</name></domainsnapshot>")
			if !errors.Is(err, errdefs.ErrInternal) || errors.Is(err, errdefs.ErrInvalidSchema) {
				t.Fatalf("%s: %v, want ErrInternal", what, err)
			}
		})
	}
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := validateSchema(cctx, "<domainsnapshot/>"); errdefs.CodeOf(err) != errdefs.CodeOperationAborted {
		t.Fatalf("cancelled: %v (code %d)", err, errdefs.CodeOf(err))
	}
}

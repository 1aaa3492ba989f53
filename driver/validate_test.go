package driver

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
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

// TestValidateOpensNothing: under VALIDATE a document's DOCTYPE may name a
// local file (an external parameter entity) or a URL (an external DTD);
// libvirt opens neither, and neither may xlsnap's validator: the file's
// content must not come back in the error, the HTTP server must see no
// request. A valid document keeps validating with a DOCTYPE, and the
// message is libxml2's alone, without xmllint's location prefix.
func TestValidateOpensNothing(t *testing.T) {
	ctx := context.Background()
	secret := filepath.Join(t.TempDir(), "secret")
	const marker = "MARKER-4e1c9d-not-for-the-error"
	if err := os.WriteFile(secret, []byte(marker+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var hits atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		fmt.Fprintf(w, "<!ENTITY leak %q>", marker)
	}))
	defer srv.Close()
	for name, doc := range map[string]string{
		"file entity":                   `<!DOCTYPE domainsnapshot [<!ENTITY % x SYSTEM "file://` + secret + `"> %x;]><domainsnapshot><name>v</name></domainsnapshot>`,
		"file entity, invalid":          `<!DOCTYPE domainsnapshot [<!ENTITY % x SYSTEM "file://` + secret + `"> %x;]><domainsnapshot><name>v</name><bogus/></domainsnapshot>`,
		"url dtd":                       `<!DOCTYPE domainsnapshot SYSTEM "` + srv.URL + `/e.dtd"><domainsnapshot><name>v</name></domainsnapshot>`,
		"url entity":                    `<?xml version="1.0"?><!-- c --><!DOCTYPE domainsnapshot [<!ENTITY % y SYSTEM "` + srv.URL + `/p.dtd"> %y;]><domainsnapshot><name>v</name></domainsnapshot>`,
		"two doctypes, not well-formed": `<!DOCTYPE a><!DOCTYPE domainsnapshot SYSTEM "` + srv.URL + `/2.dtd"><domainsnapshot><name>v</name></domainsnapshot>`,
	} {
		t.Run(name, func(t *testing.T) {
			err := validateSchema(ctx, doc)
			if err != nil && strings.Contains(err.Error(), marker) {
				t.Fatalf("the error quotes the local file: %v", err)
			}
			switch {
			case strings.Contains(name, "not well-formed"):
				// Refused or not: only what it opened matters.
			case strings.Contains(name, "invalid"):
				if !errors.Is(err, errdefs.ErrInvalidSchema) {
					t.Fatalf("an invalid document: %v", err)
				}
			case err != nil:
				t.Fatalf("a valid document with a DOCTYPE: %v", err)
			}
		})
	}
	if n := hits.Load(); n != 0 {
		t.Fatalf("the validator made %d HTTP requests", n)
	}
	// The whole public path, too: the driver's parser with VALIDATE.
	_, err := parseSnapshot(ctx, `<!DOCTYPE domainsnapshot [<!ENTITY % x SYSTEM "file://`+secret+`"> %x;]><domainsnapshot><name>v</name><bogus/></domainsnapshot>`, true)
	if !errors.Is(err, errdefs.ErrInvalidSchema) || strings.Contains(err.Error(), marker) {
		t.Fatalf("parseSnapshot with VALIDATE: %v", err)
	}
}

// TestValidateMessage: the reason is libxml2's message as libvirt prints
// it, without xmllint's "-:1: element bogus: Relax-NG validity error : ".
func TestValidateMessage(t *testing.T) {
	err := validateSchema(context.Background(), "<domainsnapshot><name>v1</name><bogus/></domainsnapshot>")
	want := "Unable to validate doc against " + snapshotSchema + "\nElement domainsnapshot has extra content: bogus"
	if err == nil || !strings.HasSuffix(err.Error(), want) || strings.Contains(err.Error(), "Relax-NG validity error") {
		t.Fatalf("got %q, want it to end with %q", err, want)
	}
}

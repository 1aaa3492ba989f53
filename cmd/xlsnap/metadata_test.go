package main

import (
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/xlsnap/xlsnap/errdefs"
)

func TestParseMetadataURL(t *testing.T) {
	for _, c := range []struct {
		in        string
		tls       bool
		endpoints []string
		prefix    string
		wantTLS   bool
	}{
		{in: "etcd://127.0.0.1:2379", endpoints: []string{"http://127.0.0.1:2379"}},
		{in: "etcd://a:1,b:2,c:3/pool7", endpoints: []string{"http://a:1", "http://b:2", "http://c:3"}, prefix: "/pool7/"},
		{in: "etcd://a:1/x/y/", endpoints: []string{"http://a:1"}, prefix: "/x/y/"},
		{in: "etcds://a:1", endpoints: []string{"https://a:1"}, wantTLS: true},
		{in: "etcd://a:1", tls: true, endpoints: []string{"https://a:1"}, wantTLS: true},
	} {
		got, err := parseMetadataURL(c.in, c.tls)
		if err != nil || !slices.Equal(got.Endpoints, c.endpoints) || got.Prefix != c.prefix || (got.TLS != nil) != c.wantTLS {
			t.Errorf("%s: %+v %v", c.in, got, err)
		}
	}
	for _, in := range []string{"", "127.0.0.1:2379", "http://a:1", "etcd://", "etcd://a", "etcd://a:", "etcd://:1",
		"etcd://a:1,", "etcd://a:x", "etcd://a:1:2", "etcd://u@a:1", "etcd://[::1]:1"} {
		if _, err := parseMetadataURL(in, false); errdefs.CodeOf(err) != errdefs.CodeInvalidArg || !strings.Contains(err.Error(), "--metadata-store") {
			t.Errorf("%q: %v, want an invalid argument naming --metadata-store", in, err)
		}
	}
}

func TestParseConfig(t *testing.T) {
	got, err := parseConfig(strings.NewReader("# cluster\n\nmetadata-store = etcd://a:1\n  metadata-host=xen1  \nmetadata-lease = 3\n"))
	if err != nil || len(got) != 3 || got["metadata-store"] != "etcd://a:1" || got["metadata-host"] != "xen1" || got["metadata-lease"] != "3" {
		t.Fatalf("%v %v", got, err)
	}
	for in, want := range map[string]string{
		"metadata-store etcd://a:1":                  "line 1",
		"state-dir = /x":                             "unknown option",
		"metadata-host = a\nmetadata-host = b":       "given twice",
		"metadata-cacert =":                          "no value",
		"# c\nmetadata-store = etcd://a:1\nnonsense": "line 3",
	} {
		if _, err := parseConfig(strings.NewReader(in)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: %v, want %q", in, err, want)
		}
	}
}

// TestMetadataOptions: a config file supplies what no flag gives, a flag
// wins over it, and the TLS options alone (no store) are refused.
func TestMetadataOptions(t *testing.T) {
	c := newCLI(t)
	conf := c.path("xlsnap.conf")
	writeFile(t, conf, "metadata-store = etcd://127.0.0.1:1\n")
	_, stderr, code := runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "--config", conf, "--metadata-store", "bogus", "snapshot-list", "vm")
	if code != 1 || !strings.Contains(stderr, `--metadata-store "bogus"`) {
		t.Errorf("a flag over the config file: exit %d %s", code, stderr)
	}
	_, stderr, code = runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "--metadata-cacert", conf, "snapshot-list", "vm")
	if code != 1 || !strings.Contains(stderr, "need --metadata-store") {
		t.Errorf("TLS options without a store: exit %d %s", code, stderr)
	}
	writeFile(t, conf, "metadata-store = etcd://127.0.0.1:1:2\n")
	_, stderr, code = runXlsnap(t, "--connect", "file://"+c.dir, "--state-dir", c.state, "--config", conf, "snapshot-list", "vm")
	if code != 1 || !strings.Contains(stderr, "127.0.0.1:1:2") {
		t.Errorf("the config file's store: exit %d %s", code, stderr)
	}
}

func FuzzParseMetadataURL(f *testing.F) {
	for _, s := range []string{"etcd://a:1", "etcds://a:1,b:2/p", "etcd://a:1/x/", "http://a:1", "etcd://[::1]:1"} {
		f.Add(s, false)
	}
	f.Fuzz(func(t *testing.T, s string, tls bool) {
		cfg, err := parseMetadataURL(s, tls)
		if err != nil {
			return
		}
		if len(cfg.Endpoints) == 0 {
			t.Fatalf("%q: no endpoint and no error", s)
		}
		for _, e := range cfg.Endpoints {
			if !strings.HasPrefix(e, "http://") && !strings.HasPrefix(e, "https://") || strings.ContainsAny(e[8:], "/@ ") {
				t.Fatalf("%q: endpoint %q", s, e)
			}
		}
		if cfg.Prefix != "" && (!strings.HasPrefix(cfg.Prefix, "/") || !strings.HasSuffix(cfg.Prefix, "/")) {
			t.Fatalf("%q: prefix %q", s, cfg.Prefix)
		}
	})
}

func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{"metadata-store = etcd://a:1\n", "# c\n\nmetadata-host=x\n", "x", "metadata-key = \n"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		got, err := parseConfig(strings.NewReader(s))
		if err != nil {
			return
		}
		for k, v := range got {
			if !isMetadataKey(k) || v == "" || strings.TrimSpace(v) != v {
				t.Fatalf("%q: %q = %q", s, k, v)
			}
		}
	})
}

func writeFile(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o644); err != nil {
		t.Fatal(err)
	}
}

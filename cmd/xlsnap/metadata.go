package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/xlsnap/xlsnap/driver"
	"github.com/xlsnap/xlsnap/storage/metastore"
)

// metadataOptions say where the metadata lives: the embedded bbolt file
// in --state-dir (the default), or a cluster's etcd (--metadata-store), for
// hosts that share pools.
type metadataOptions struct {
	flags                        *pflag.FlagSet
	config                       string
	url, cacert, cert, key, host string
	lease                        int
}

// metadataKeys are the options a config file may set, by flag name.
var metadataKeys = []string{"metadata-store", "metadata-cacert", "metadata-cert", "metadata-key", "metadata-host", "metadata-lease"}

func (g *globals) registerMetadata(f *pflag.FlagSet) {
	o := &g.meta
	o.flags = f
	f.StringVar(&o.config, "config", os.Getenv("XLSNAP_CONFIG"),
		"file of \"option = value\" lines for the --metadata options (flags win over it)")
	// Not --metadata: snapshot-delete and snapshot-list have virsh's
	// --metadata, which a global option of that name would shadow.
	f.StringVar(&o.url, "metadata-store", "",
		"metadata store: etcd://HOST:PORT[,HOST:PORT...][/PREFIX] (etcds:// for TLS) for hosts sharing pools; default the bbolt file in --state-dir")
	f.StringVar(&o.cacert, "metadata-cacert", "", "CA certificate (PEM) the etcd members' certificates are checked against")
	f.StringVar(&o.cert, "metadata-cert", "", "client certificate (PEM) for etcd")
	f.StringVar(&o.key, "metadata-key", "", "client certificate's private key (PEM) for etcd")
	f.StringVar(&o.host, "metadata-host", "", "this host's name among the hosts of the cluster (default: the system's host name)")
	f.IntVar(&o.lease, "metadata-lease", 10, "seconds a host's domain locks outlive its last word to etcd: another host takes over a dead host's operations after that")
}

// etcdConfig is what opening a cluster store needs.
type etcdConfig struct {
	Endpoints []string
	Prefix    string
	TLS       *tls.Config
	Host      string
	LockTTL   time.Duration
}

// openStore opens the metadata store the options name: nil for the
// embedded default (the driver opens it in --state-dir).
func (g *globals) openStore(ctx context.Context) (metastore.Store, error) {
	o := &g.meta
	if err := o.applyConfig(); err != nil {
		return nil, err
	}
	if o.url == "" {
		if o.cacert != "" || o.cert != "" || o.key != "" {
			return nil, usagef("--metadata-cacert, --metadata-cert and --metadata-key need --metadata-store etcd://...")
		}
		return nil, nil
	}
	cfg, err := parseMetadataURL(o.url, o.cacert != "" || o.cert != "" || o.key != "")
	if err != nil {
		return nil, err
	}
	if cfg.TLS != nil {
		if err := loadTLS(cfg.TLS, o.cacert, o.cert, o.key); err != nil {
			return nil, err
		}
	}
	if o.lease < 1 {
		return nil, usagef("--metadata-lease must be at least 1 second")
	}
	cfg.Host, cfg.LockTTL = o.host, time.Duration(o.lease)*time.Second
	return openEtcd(ctx, cfg)
}

// applyConfig reads --config and takes from it each option not given as
// a flag.
func (o *metadataOptions) applyConfig() error {
	if o.config == "" {
		return nil
	}
	f, err := os.Open(o.config)
	if err != nil {
		return fmt.Errorf("%w: --config: %w", driver.ErrInvalidArg, err)
	}
	defer f.Close()
	vals, err := parseConfig(f)
	if err != nil {
		return fmt.Errorf("%w: %s: %w", driver.ErrInvalidArg, o.config, err)
	}
	for name, v := range vals {
		if !o.flags.Changed(name) {
			if err := o.flags.Set(name, v); err != nil {
				return fmt.Errorf("%w: %s: %s: %w", driver.ErrInvalidArg, o.config, name, err)
			}
		}
	}
	return nil
}

// parseConfig reads "option = value" lines (blank lines and lines
// starting with # are skipped), each option one of metadataKeys, given
// once.
func parseConfig(r io.Reader) (map[string]string, error) {
	out := map[string]string{}
	sc := bufio.NewScanner(r)
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch {
		case !ok:
			return nil, fmt.Errorf("line %d: want \"option = value\"", n)
		case !isMetadataKey(k):
			return nil, fmt.Errorf("line %d: unknown option %q (known: %s)", n, k, strings.Join(metadataKeys, ", "))
		case out[k] != "":
			return nil, fmt.Errorf("line %d: %s given twice", n, k)
		case v == "":
			return nil, fmt.Errorf("line %d: %s has no value", n, k)
		}
		out[k] = v
	}
	return out, sc.Err()
}

func isMetadataKey(k string) bool {
	for _, m := range metadataKeys {
		if k == m {
			return true
		}
	}
	return false
}

// parseMetadataURL parses etcd://HOST:PORT[,HOST:PORT...][/PREFIX]; the
// etcds scheme, or withTLS (a certificate option given), makes every
// endpoint https.
func parseMetadataURL(s string, withTLS bool) (etcdConfig, error) {
	bad := func(why string) (etcdConfig, error) {
		return etcdConfig{}, usagef("--metadata-store %q: %s (want etcd://HOST:PORT[,HOST:PORT...][/PREFIX])", s, why)
	}
	scheme, rest, ok := strings.Cut(s, "://")
	switch {
	case !ok:
		return bad("no scheme")
	case scheme == "etcds":
		withTLS = true
	case scheme != "etcd":
		return bad("unknown scheme " + scheme)
	}
	hosts, prefix, _ := strings.Cut(rest, "/")
	cfg := etcdConfig{}
	if prefix != "" {
		cfg.Prefix = "/" + strings.TrimSuffix(prefix, "/") + "/"
	}
	proto := "http://"
	if withTLS {
		proto = "https://"
		cfg.TLS = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	for _, h := range strings.Split(hosts, ",") {
		host, port, ok := strings.Cut(h, ":")
		if !ok || host == "" || port == "" || strings.ContainsAny(h, " @?#[]") || strings.Count(h, ":") != 1 {
			return bad(fmt.Sprintf("endpoint %q is not HOST:PORT", h))
		}
		for _, c := range port {
			if c < '0' || c > '9' {
				return bad(fmt.Sprintf("endpoint %q: port is not a number", h))
			}
		}
		cfg.Endpoints = append(cfg.Endpoints, proto+h)
	}
	return cfg, nil
}

// loadTLS fills c from the PEM files: the CA the members are checked
// against (the system's when none), and a client certificate.
func loadTLS(c *tls.Config, cacert, cert, key string) error {
	if cacert != "" {
		pem, err := os.ReadFile(cacert)
		if err != nil {
			return fmt.Errorf("%w: --metadata-cacert: %w", driver.ErrInvalidArg, err)
		}
		c.RootCAs = x509.NewCertPool()
		if !c.RootCAs.AppendCertsFromPEM(pem) {
			return usagef("--metadata-cacert %s: no PEM certificate", cacert)
		}
	}
	if (cert == "") != (key == "") {
		return usagef("--metadata-cert and --metadata-key go together")
	}
	if cert != "" {
		pair, err := tls.LoadX509KeyPair(cert, key)
		if err != nil {
			return fmt.Errorf("%w: --metadata-cert/--metadata-key: %w", driver.ErrInvalidArg, err)
		}
		c.Certificates = []tls.Certificate{pair}
	}
	return nil
}

// Package etcdtest runs a real etcd cluster for tests: members are
// processes of the etcd binary (Debian's etcd-server, which
// scripts/deps.sh installs) on loopback, on ports the kernel picked, each
// in a folder of the test's own; the test's end stops them.
package etcdtest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
)

// Cluster is a running cluster.
type Cluster struct {
	// Endpoints are the members' client URLs.
	Endpoints []string
	members   []*member
	tb        testing.TB
}

type member struct {
	name, dir, client, peer string
	args                    []string
	cmd                     *exec.Cmd
	done                    chan struct{}
}

// Start starts an n-member cluster and returns once it has a leader. It
// skips the test where no etcd binary is installed, unless XLSNAP_NEED_ETCD
// is set (make test sets it: there the cluster tests must run).
func Start(tb testing.TB, n int) *Cluster {
	tb.Helper()
	bin, err := exec.LookPath("etcd")
	if err != nil {
		if os.Getenv("XLSNAP_NEED_ETCD") != "" {
			tb.Fatalf("no etcd binary (apt-get install etcd-server): %v", err)
		}
		tb.Skipf("no etcd binary (apt-get install etcd-server; make test installs it): %v", err)
	}
	var lastErr error
	for range 3 { // a port another process took between pick and use
		c, err := start(tb, bin, n)
		if err == nil {
			return c
		}
		lastErr = err
	}
	tb.Fatalf("starting a %d-member etcd cluster: %v", n, lastErr)
	return nil
}

func start(tb testing.TB, bin string, n int) (*Cluster, error) {
	dir := tb.TempDir()
	c := &Cluster{tb: tb}
	var initial []string
	for i := range n {
		m := &member{name: fmt.Sprintf("m%d", i), dir: filepath.Join(dir, fmt.Sprintf("m%d", i))}
		ports, err := freePorts(2)
		if err != nil {
			return nil, err
		}
		m.client = fmt.Sprintf("http://127.0.0.1:%d", ports[0])
		m.peer = fmt.Sprintf("http://127.0.0.1:%d", ports[1])
		initial = append(initial, m.name+"="+m.peer)
		c.members = append(c.members, m)
		c.Endpoints = append(c.Endpoints, m.client)
	}
	for _, m := range c.members {
		m.args = []string{bin, "--name", m.name, "--data-dir", m.dir,
			"--listen-client-urls", m.client, "--advertise-client-urls", m.client,
			"--listen-peer-urls", m.peer, "--initial-advertise-peer-urls", m.peer,
			"--initial-cluster", strings.Join(initial, ","), "--initial-cluster-state", "new",
			"--initial-cluster-token", filepath.Base(dir),
			// Fast elections on loopback, big transactions for big
			// domains (a move rewrites every snapshot record at once).
			"--heartbeat-interval", "25", "--election-timeout", "250",
			"--max-txn-ops", "100000", "--max-request-bytes", "33554432",
			"--logger", "zap", "--log-outputs", filepath.Join(dir, m.name+".log")}
	}
	tb.Cleanup(c.stop)
	for i := range c.members {
		if err := c.run(i); err != nil {
			return nil, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.waitReady(ctx); err != nil {
		c.stop()
		return nil, err
	}
	return c, nil
}

func (c *Cluster) run(i int) error {
	m := c.members[i]
	m.cmd = exec.Command(m.args[0], m.args[1:]...)
	m.cmd.Env = append(os.Environ(), "ETCD_UNSUPPORTED_ARCH=")
	if err := m.cmd.Start(); err != nil {
		return err
	}
	m.done = make(chan struct{})
	go func() { m.cmd.Wait(); close(m.done) }()
	return nil
}

// waitReady waits until a write through every live member's endpoint
// commits (the cluster has a leader and quorum).
func (c *Cluster) waitReady(ctx context.Context) error {
	for _, m := range c.members {
		if m.cmd == nil {
			continue
		}
		for {
			select {
			case <-m.done:
				log, _ := os.ReadFile(filepath.Join(filepath.Dir(m.dir), m.name+".log"))
				return fmt.Errorf("member %s exited: %s", m.name, tail(string(log)))
			default:
			}
			err := func() error {
				cli, err := clientv3.New(clientv3.Config{Endpoints: []string{m.client}, DialTimeout: time.Second, Logger: zap.NewNop()})
				if err != nil {
					return err
				}
				defer cli.Close()
				rctx, cancel := context.WithTimeout(ctx, time.Second)
				defer cancel()
				_, err = cli.Put(rctx, "/etcdtest/ready", m.name)
				return err
			}()
			if err == nil {
				break
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("member %s not ready: %w", m.name, err)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}
	return nil
}

func tail(s string) string {
	if len(s) > 2000 {
		return s[len(s)-2000:]
	}
	return s
}

// Kill kills member i with SIGKILL and waits for it to be gone.
func (c *Cluster) Kill(i int) {
	m := c.members[i]
	if m.cmd == nil {
		return
	}
	m.cmd.Process.Signal(syscall.SIGKILL)
	<-m.done
	m.cmd = nil
}

// Restart starts every member Kill or Stop stopped again on its data,
// and waits until the cluster answers through each.
func (c *Cluster) Restart() {
	c.tb.Helper()
	for i, m := range c.members {
		if m.cmd != nil {
			continue
		}
		for j, a := range m.args {
			if a == "new" {
				m.args[j] = "existing"
			}
		}
		if err := c.run(i); err != nil {
			c.tb.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := c.waitReady(ctx); err != nil {
		c.tb.Fatal(err)
	}
}

// Stop stops every member (SIGKILL): the cluster no longer answers.
func (c *Cluster) Stop() { c.stop() }

func (c *Cluster) stop() {
	for i := range c.members {
		c.Kill(i)
	}
}

// freePorts asks the kernel for n free loopback ports.
func freePorts(n int) ([]int, error) {
	var out []int
	var ls []net.Listener
	defer func() {
		for _, l := range ls {
			l.Close()
		}
	}()
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		ls = append(ls, l)
		out = append(out, l.Addr().(*net.TCPAddr).Port)
	}
	return out, nil
}

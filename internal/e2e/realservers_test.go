package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
)

// Real servers and clients from Debian packages, run on free 127.0.0.1
// ports in temporary directories for the opaque TCP tests. Every server is
// a child of the test process (killed if the test binary dies), stopped in
// t.Cleanup, and checked gone afterwards.

// tool returns the path of program name from Debian package pkg. A missing
// tool fails the test (it is not skipped): the message names the package.
func debTool(t *testing.T, name, pkg string) string {
	t.Helper()
	skipShort(t, name+" (a real peer)")
	// PostgreSQL's programs first from their versioned directory (newest
	// first): /usr/bin/pgbench is a wrapper that fails without the server
	// package. Then PATH, then sbin, which a non-root PATH may lack.
	pg, _ := filepath.Glob("/usr/lib/postgresql/*/bin/" + name)
	slices.SortFunc(pg, func(a, b string) int { return pgVersion(b) - pgVersion(a) })
	if p, err := exec.LookPath(name); err == nil {
		pg = append(pg, p)
	}
	for _, p := range append(pg, "/usr/sbin/"+name, "/sbin/"+name) {
		if fi, err := os.Stat(p); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p
		}
	}
	t.Fatalf("%s not found: install the Debian package %s (apt-get install %s)", name, pkg, pkg)
	return ""
}

func pgVersion(path string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(filepath.Dir(path))))
	return v
}

// serverProc is a server process started by the test.
type serverProc struct {
	name string
	cmd  *exec.Cmd
	log  *procOutput
	done chan struct{} // closed when the process has exited
	err  error         // of Wait, once done
}

type procOutput struct {
	mu sync.Mutex // guards b
	b  bytes.Buffer
}

func (l *procOutput) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *procOutput) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// serverProcOptions shape startDaemon.
type serverProcOptions struct {
	// Dir is the working directory.
	Dir string
	// As runs the process as this user (by name) when the test runs as root.
	As string
	// Stop is the signal that shuts the server down cleanly (SIGTERM when 0).
	Stop syscall.Signal
}

// startDaemon runs path with args in its own process group. Cleanup sends
// the stop signal to the group, waits up to 10 s (then kills it), and fails
// the test if anything of the group is left.
func startServerProc(t *testing.T, name, path string, args []string, o serverProcOptions) *serverProc {
	t.Helper()
	d := &serverProc{name: name, log: &procOutput{}, done: make(chan struct{})}
	d.cmd = exec.Command(path, args...)
	d.cmd.Dir = o.Dir
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if o.As != "" && os.Geteuid() == 0 {
		d.cmd.SysProcAttr.Credential = credential(t, o.As)
	}
	if err := d.cmd.Start(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	go func() {
		d.err = d.cmd.Wait()
		close(d.done)
	}()
	stop := o.Stop
	if stop == 0 {
		stop = syscall.SIGTERM
	}
	t.Cleanup(func() {
		pgid := d.cmd.Process.Pid
		_ = syscall.Kill(-pgid, stop)
		select {
		case <-d.done:
		case <-time.After(10 * time.Second):
			t.Errorf("%s did not stop within 10s of %v; killing it", name, stop)
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-d.done
		}
		// Nothing of the group may outlive the test (forked helpers
		// included).
		deadline := time.Now().Add(5 * time.Second)
		for syscall.Kill(-pgid, 0) == nil {
			if time.Now().After(deadline) {
				_ = syscall.Kill(-pgid, syscall.SIGKILL)
				t.Errorf("%s: processes of group %d left after stop", name, pgid)
				break
			}
			time.Sleep(10 * time.Millisecond)
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", name, lastLines(d.log.String(), 40))
		}
	})
	return d
}

// exited reports whether the process has exited (it should not have).
func (d *serverProc) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

func credential(t *testing.T, name string) *syscall.Credential {
	t.Helper()
	u, err := user.Lookup(name)
	if err != nil {
		t.Fatalf("user %s: %v (created by its Debian package)", name, err)
	}
	uid, _ := strconv.ParseUint(u.Uid, 10, 32)
	gid, _ := strconv.ParseUint(u.Gid, 10, 32)
	return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid)}
}

// waitServing waits until d accepts connections on addr and ready (when
// not nil) returns nil.
func waitServing(t *testing.T, d *serverProc, addr string, ready func() error) {
	t.Helper()
	testutil.Eventually(t, 30*time.Second, d.name+" serving on "+addr, func() error {
		if d.exited() {
			t.Fatalf("%s exited (%v) before serving on %s:\n%s", d.name, d.err, addr, lastLines(d.log.String(), 40))
		}
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			if ready == nil {
				return nil
			}
			err = ready()
		}
		if err != nil {
			return fmt.Errorf("%w\n%s", err, lastLines(d.log.String(), 40))
		}
		return nil
	})
}

// run runs a client program with a deadline and returns its stdout; a
// non-zero exit fails the test with the program's stderr.
func runProg(t *testing.T, timeout time.Duration, stdin []byte, path string, args ...string) string {
	t.Helper()
	out, errOut, err := runProgErr(timeout, stdin, path, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\nstdout: %.2000s\nstderr: %.2000s", filepath.Base(path), argsString(args), err, lastLines(out, 20), lastLines(errOut, 20))
	}
	return out
}

// argsString joins args for a message, long ones abbreviated.
func argsString(args []string) string {
	var b strings.Builder
	for i, a := range args {
		if i > 0 {
			b.WriteByte(' ')
		}
		if len(a) > 80 {
			a = fmt.Sprintf("%.60s...(%d bytes)", a, len(a))
		}
		b.WriteString(a)
	}
	return b.String()
}

func runProgErr(timeout time.Duration, stdin []byte, path string, args ...string) (stdout, stderr string, err error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, path, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var o, e bytes.Buffer
	cmd.Stdout, cmd.Stderr = &o, &e
	err = cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %w", timeout, err)
	}
	return o.String(), e.String(), err
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// rootTempDir makes a temporary directory directly under the system temp
// dir (t.TempDir's parents are private to root, so another user could not
// reach it), owned by user as when running as root, removed in Cleanup.
func rootTempDir(t *testing.T, pattern, as string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", pattern)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if as != "" && os.Geteuid() == 0 {
		c := credential(t, as)
		if err := os.Chown(dir, int(c.Uid), int(c.Gid)); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// redisServer is redis-server (Debian redis-server) on a free port, no
// persistence.
func startRedis(t *testing.T) (port int) {
	t.Helper()
	bin := debTool(t, "redis-server", "redis-server")
	port = freePorts(t, 1)[0]
	dir := t.TempDir()
	d := startServerProc(t, "redis-server", bin, []string{
		"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--dir", dir,
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--protected-mode", "no",
	}, serverProcOptions{Dir: dir})
	cli := debTool(t, "redis-cli", "redis-tools")
	waitServing(t, d, hostPort(port), func() error {
		out, _, err := runProgErr(5*time.Second, nil, cli, "-h", "127.0.0.1", "-p", strconv.Itoa(port), "PING")
		if err == nil && strings.TrimSpace(out) != "PONG" {
			err = fmt.Errorf("PING answered %q", out)
		}
		return err
	})
	return port
}

// startMosquitto runs the mosquitto broker (Debian mosquitto) on a free
// port: anonymous clients, no persistence.
func startMosquitto(t *testing.T) (port int) {
	t.Helper()
	bin := debTool(t, "mosquitto", "mosquitto")
	port = freePorts(t, 1)[0]
	dir := t.TempDir()
	conf := fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\npersistence false\nlog_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n", port)
	if os.Geteuid() == 0 {
		conf += "user root\n" // stay a child we can signal
	}
	path := filepath.Join(dir, "mosquitto.conf")
	if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startServerProc(t, "mosquitto", bin, []string{"-c", path}, serverProcOptions{Dir: dir})
	waitServing(t, d, hostPort(port), nil)
	return port
}

// startPostgres runs PostgreSQL (Debian postgresql) on a free port: initdb
// of a fresh cluster (superuser postgres, trust authentication), then the
// postmaster in the foreground, both as the postgres user when the test
// runs as root (PostgreSQL refuses root). Durability is off: test data.
func startPostgres(t *testing.T) (port int) {
	t.Helper()
	initdb := debTool(t, "initdb", "postgresql")
	postgres := debTool(t, "postgres", "postgresql")
	debTool(t, "psql", "postgresql-client")
	port = freePorts(t, 1)[0]
	dir := rootTempDir(t, "meshlet-pg-", "postgres")
	data := filepath.Join(dir, "data")
	init := startServerProc(t, "initdb", initdb, []string{"-D", data, "-U", "postgres", "--auth=trust", "-N", "-E", "UTF8", "--locale=C"},
		serverProcOptions{Dir: dir, As: "postgres"})
	select {
	case <-init.done:
		if init.err != nil {
			t.Fatalf("initdb: %v\n%s", init.err, lastLines(init.log.String(), 30))
		}
	case <-time.After(60 * time.Second):
		t.Fatal("initdb: not done after 60s")
	}
	// SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for clients).
	d := startServerProc(t, "postgres", postgres, []string{
		"-D", data, "-p", strconv.Itoa(port), "-c", "listen_addresses=127.0.0.1", "-k", dir,
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=50",
	}, serverProcOptions{Dir: dir, As: "postgres", Stop: syscall.SIGINT})
	psql := debTool(t, "psql", "postgresql-client")
	waitServing(t, d, hostPort(port), func() error {
		_, e, err := runProgErr(5*time.Second, nil, psql, "-h", "127.0.0.1", "-p", strconv.Itoa(port), "-U", "postgres", "-d", "postgres", "-Atc", "select 1")
		if err != nil {
			return fmt.Errorf("%w: %s", err, e)
		}
		return nil
	})
	return port
}

// mariaDB credentials of the user startMariaDB creates.
const (
	mariaDBUser     = "meshlet"
	mariaDBPassword = "meshlet-pw"
)

// startMariaDB runs MariaDB (Debian mariadb-server) on a free port with a
// fresh data directory and a user mariaDBUser that authenticates with a
// password over TCP. Small InnoDB files and no fsync: test data.
func startMariaDB(t *testing.T) (port int) {
	t.Helper()
	install := debTool(t, "mariadb-install-db", "mariadb-server")
	server := debTool(t, "mariadbd", "mariadb-server")
	client := debTool(t, "mariadb", "mariadb-client")
	port = freePorts(t, 1)[0]
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	common := []string{"--no-defaults"} // first: ignore /etc/mysql
	common = append(common, "--datadir="+data, "--skip-log-bin", "--innodb-log-file-size=4M", "--innodb-buffer-pool-size=16M",
		"--innodb-flush-method=nosync", "--innodb-data-file-path=ibdata1:4M:autoextend")
	if os.Geteuid() == 0 {
		common = append(common, "--user=root")
	}
	inst := startServerProc(t, "mariadb-install-db", install, append(slices.Clone(common), "--auth-root-authentication-method=normal", "--skip-test-db"),
		serverProcOptions{Dir: dir})
	select {
	case <-inst.done:
		if inst.err != nil {
			t.Fatalf("mariadb-install-db: %v\n%s", inst.err, lastLines(inst.log.String(), 30))
		}
	case <-time.After(60 * time.Second):
		t.Fatal("mariadb-install-db: not done after 60s")
	}
	initSQL := filepath.Join(dir, "init.sql")
	sql := fmt.Sprintf("CREATE USER '%s'@'%%' IDENTIFIED BY '%s';\nGRANT ALL ON *.* TO '%s'@'%%';\n", mariaDBUser, mariaDBPassword, mariaDBUser)
	if err := os.WriteFile(initSQL, []byte(sql), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startServerProc(t, "mariadbd", server, append(slices.Clone(common),
		"--port="+strconv.Itoa(port), "--bind-address=127.0.0.1", "--socket="+filepath.Join(dir, "mysqld.sock"),
		"--pid-file="+filepath.Join(dir, "mysqld.pid"), "--skip-name-resolve", "--init-file="+initSQL,
	), serverProcOptions{Dir: dir})
	waitServing(t, d, hostPort(port), func() error {
		_, e, err := runProgErr(5*time.Second, nil, client, mariaDBArgs(port, "SELECT 1")...)
		if err != nil {
			return fmt.Errorf("%w: %s", err, e)
		}
		return nil
	})
	return port
}

// mariaDBArgs are the mariadb client's arguments to run sql against addr's
// port on 127.0.0.1 as mariaDBUser, tab-separated output without headers.
func mariaDBArgs(port int, sql string) []string {
	return []string{"--no-defaults", "--skip-ssl", "-h", "127.0.0.1", "-P", strconv.Itoa(port), "-u", mariaDBUser,
		"-p" + mariaDBPassword, "--batch", "--skip-column-names", "--connect-timeout=5", "-e", sql}
}

// portOf returns the port of a "host:port" address.
func portOf(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

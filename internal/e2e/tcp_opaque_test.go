package e2e

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
)

// Issue 6, row "Opaque TCP": real servers and real clients from Debian
// packages through two sidecars with mTLS between them (startPair, protocol
// tcp): Redis (redis-benchmark, redis-cli), MQTT (mosquitto, mosquitto_pub,
// mosquitto_sub), PostgreSQL (pgbench, psql), a server-first protocol
// (MariaDB: the server speaks first) and TCP half-close in both directions.

// connSanity is the state of the test process before a load: after it,
// both sidecars must have closed every proxied connection and the
// goroutines must come back to about where they were (no leaked pipes).
type connSanity struct {
	goroutines int
	heap       uint64
}

func startSanity() connSanity {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return connSanity{goroutines: runtime.NumGoroutine(), heap: ms.HeapInuse}
}

// check waits until the pair's sidecars have no open downstream
// connection and the goroutine count is back within slack of the baseline,
// and logs the heap in use before and after.
func (s connSanity) check(t *testing.T, p *sidecarPair, what string) {
	t.Helper()
	const name = "meshlet_sidecar_downstream_connections_active"
	testutil.Until(t, 10*time.Second, what+": both sidecars closing every proxied connection", func() bool {
		return p.Down.metric(t, name) == 0 && p.Up.metric(t, name) == 0
	})
	const slack = 30 // HTTP keep-alive connections of the metrics scrapes, timers
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > s.goroutines+slack {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("%s: %d goroutines after the load, %d before (slack %d):\n%s", what, runtime.NumGoroutine(), s.goroutines, slack, lastLines(string(buf[:n]), 200))
		}
		time.Sleep(20 * time.Millisecond)
	}
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	t.Logf("%s: goroutines %d → %d; heap in use %.1f MiB → %.1f MiB (test process: Consul client, control plane, both sidecars)",
		what, s.goroutines, runtime.NumGoroutine(), float64(s.heap)/(1<<20), float64(ms.HeapInuse)/(1<<20))
	if grow := int64(ms.HeapInuse) - int64(s.heap); grow > 64<<20 {
		t.Errorf("%s: heap in use grew by %d MiB after the connections closed", what, grow>>20)
	}
}

// redisOps are the redis-benchmark tests run, as it reports them.
var redisOps = []string{"SET", "GET", "INCR", "LPUSH", "LPOP"}

// redisBenchmark runs redis-benchmark against addr and returns requests per
// second by operation. Any error output or a missing operation fails.
func redisBenchmark(t *testing.T, bin, addr string, n, clients, pipeline int) map[string]float64 {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	args := []string{"-h", host, "-p", port, "-n", strconv.Itoa(n), "-c", strconv.Itoa(clients), "-P", strconv.Itoa(pipeline),
		"--csv", "-t", strings.ToLower(strings.Join(redisOps, ","))}
	out, errOut, err := runProgErr(90*time.Second, nil, bin, args...)
	if err != nil || strings.Contains(strings.ToLower(out+errOut), "error") {
		t.Fatalf("redis-benchmark %s: %v\nstdout: %s\nstderr: %s", strings.Join(args, " "), err, lastLines(out, 20), lastLines(errOut, 20))
	}
	rps := map[string]float64{}
	for line := range strings.Lines(out) {
		f := strings.Split(strings.TrimSpace(line), ",")
		if len(f) < 2 {
			continue
		}
		op := strings.Trim(f[0], `"`)
		v, err := strconv.ParseFloat(strings.Trim(f[1], `"`), 64)
		if err == nil && v > 0 {
			rps[op] = v
		}
	}
	for _, op := range redisOps {
		if rps[op] == 0 {
			t.Fatalf("redis-benchmark %s: no result for %s:\n%s", strings.Join(args, " "), op, out)
		}
	}
	return rps
}

func redisCLI(t *testing.T, bin, addr string, stdin []byte, args ...string) string {
	t.Helper()
	host, port, _ := net.SplitHostPort(addr)
	return strings.TrimSpace(runProg(t, 30*time.Second, stdin, bin, append([]string{"-h", host, "-p", port}, args...)...))
}

// TestOpaqueTCPRedisBenchmark: redis-benchmark (set, get, incr, lpush,
// lpop; 20 clients, unpipelined and 16-deep pipelines) and redis-cli
// through both sidecars with mTLS. Every operation runs without error,
// INCR counts exactly the requests sent through the mesh, LPUSH/LPOP
// balance, a 1 MiB value round-trips intact, and afterwards no proxied
// connection or goroutine is left; 200 idle connections hold a bounded
// amount of memory each.
func TestOpaqueTCPRedisBenchmark(t *testing.T) {
	bench := debTool(t, "redis-benchmark", "redis-tools")
	cli := debTool(t, "redis-cli", "redis-tools")
	port := startRedis(t)
	p := startPair(t, pairOptions{Protocol: "tcp", AppPort: port})
	direct := hostPort(port)
	sanity := startSanity()

	// redis-cli round trips, a binary-safe 1 MiB value among them.
	if got := redisCLI(t, cli, p.Addr, nil, "PING"); got != "PONG" {
		t.Fatalf("PING through the mesh: %q", got)
	}
	redisCLI(t, cli, p.Addr, nil, "SET", "greeting", "hello through two sidecars")
	if got := redisCLI(t, cli, p.Addr, nil, "GET", "greeting"); got != "hello through two sidecars" {
		t.Fatalf("GET through the mesh: %q", got)
	}
	big := []byte(strings.Repeat(hex.EncodeToString(randomBytes(t, 1<<10)), 512)) // 1 MiB
	redisCLI(t, cli, p.Addr, big, "-x", "SET", "big")
	if got := redisCLI(t, cli, direct, nil, "STRLEN", "big"); got != strconv.Itoa(len(big)) {
		t.Fatalf("STRLEN of the 1 MiB value written through the mesh, read directly: %s", got)
	}
	if got := redisCLI(t, cli, p.Addr, nil, "GET", "big"); got != string(big) {
		t.Fatalf("1 MiB value read back through the mesh differs (%d bytes, want %d)", len(got), len(big))
	}

	const n, clients = 20000, 20
	counter := func() int {
		v, _ := strconv.Atoi(redisCLI(t, cli, direct, nil, "GET", "counter:__rand_int__"))
		return v
	}
	for _, pipeline := range []int{1, 16} {
		viaDirect := redisBenchmark(t, bench, direct, n, clients, pipeline)
		before := counter()
		viaMesh := redisBenchmark(t, bench, p.Addr, n, clients, pipeline)
		if got := counter() - before; got != n {
			t.Errorf("-P %d: INCR through the mesh counted %d, want exactly %d", pipeline, got, n)
		}
		if got := redisCLI(t, cli, direct, nil, "LLEN", "mylist"); got != "0" {
			t.Errorf("-P %d: LLEN mylist = %s after as many LPOPs as LPUSHes", pipeline, got)
		}
		for _, op := range redisOps {
			t.Logf("redis-benchmark -n %d -c %d -P %-2d %-5s through the mesh %9.0f req/s, direct %9.0f req/s: ratio %.2f",
				n, clients, pipeline, op, viaMesh[op], viaDirect[op], viaMesh[op]/viaDirect[op])
		}
	}
	sanity.check(t, p, "after redis-benchmark")
	idleConnections(t, p, 200)
}

// idleConnections opens n Redis connections through the pair, one PING
// each, and checks what they hold while idle in the test process (both
// sidecars): at most 100 KiB of heap and 3 goroutines per sidecar each.
// Then they close, and the sidecars let go of everything.
func idleConnections(t *testing.T, p *sidecarPair, n int) {
	t.Helper()
	sanity := startSanity()
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		c, err := net.Dial("tcp", p.Addr)
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, "PING\r\n"); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, 7)
		if _, err := io.ReadFull(c, b); err != nil || string(b) != "+PONG\r\n" {
			t.Fatalf("PING through the mesh: %q, %v", b, err)
		}
	}
	// Measured once the connections have gone idle: their goroutines back
	// waiting to read, what they borrowed for the exchange returned.
	var heapPer int64
	var goroutinesPer float64
	testutil.Eventually(t, 5*time.Second, "the idle connections to hold at most 100 KiB and 6 goroutines each", func() error {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		heapPer = (int64(ms.HeapInuse) - int64(sanity.heap)) / int64(n)
		goroutinesPer = float64(runtime.NumGoroutine()-sanity.goroutines) / float64(n)
		if heapPer > 100<<10 || goroutinesPer > 6.5 {
			return fmt.Errorf("an idle connection through the mesh holds %d KiB of heap and %.1f goroutines", heapPer>>10, goroutinesPer)
		}
		return nil
	})
	t.Logf("%d idle Redis connections through the mesh: %d KiB heap and %.1f goroutines each (both sidecars)", n, heapPer>>10, goroutinesPer)
	for _, c := range conns {
		c.Close()
	}
	conns = nil
	sanity.check(t, p, "after closing the idle connections")
}

// TestOpaqueTCPMQTT: the mosquitto broker behind the sidecars;
// mosquitto_sub and mosquitto_pub both connect through the mesh (mTLS
// between the sidecars). The subscriber receives every QoS 1 message
// published, intact and once (a 256 KiB one among them), and a retained
// message reaches a subscriber that arrives later.
func TestOpaqueTCPMQTT(t *testing.T) {
	pub := debTool(t, "mosquitto_pub", "mosquitto-clients")
	sub := debTool(t, "mosquitto_sub", "mosquitto-clients")
	port := startMosquitto(t)
	p := startPair(t, pairOptions{Protocol: "tcp", AppPort: port})
	host, mport, _ := net.SplitHostPort(p.Addr)
	sanity := startSanity()

	const n = 300
	topic := "meshlet/opaque/" + hex.EncodeToString(randomBytes(t, 4))
	want := map[string]bool{}
	var lines bytes.Buffer
	for i := range n {
		m := fmt.Sprintf("msg-%04d-%s", i, strings.Repeat(string(rune('a'+i%26)), 10+i%200))
		want[m] = true
		lines.WriteString(m + "\n")
	}
	bigMsg := "big-" + strings.Repeat(hex.EncodeToString(randomBytes(t, 1<<10)), 128) // 256 KiB
	want[bigMsg] = true

	// The subscriber prints "MSG <qos> <payload>" per message (flushed
	// per message). Probe messages, published until one arrives, tell that
	// the subscription is in place.
	cmd := exec.Command(sub, "-h", host, "-p", mport, "-i", "meshlet-sub", "-t", topic, "-q", "1", "-F", "MSG %q %p")
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr procOutput
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	subExited := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(subExited)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-subExited
	})
	probed := make(chan struct{})
	done := make(chan struct{}) // every wanted message arrived
	var msgs []string           // owned by the reader until done or subExited
	go func() {
		sc := bufio.NewScanner(stdout)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		var probeOnce, doneOnce sync.Once
		for sc.Scan() {
			m, ok := strings.CutPrefix(sc.Text(), "MSG ")
			if !ok {
				continue
			}
			if strings.HasPrefix(m, "1 probe-") {
				probeOnce.Do(func() { close(probed) })
				continue
			}
			msgs = append(msgs, m)
			if len(msgs) == len(want) {
				doneOnce.Do(func() { close(done) })
			}
		}
	}()
	for i := 0; ; i++ {
		runProg(t, 30*time.Second, nil, pub, "-h", host, "-p", mport, "-t", topic, "-q", "1", "-m", fmt.Sprintf("probe-%d", i))
		select {
		case <-probed:
		case <-subExited:
			t.Fatalf("mosquitto_sub exited: %s", stderr.String())
		case <-time.After(200 * time.Millisecond):
			if i == 50 {
				t.Fatalf("mosquitto_sub through the mesh received no probe in 10s; stderr: %s", stderr.String())
			}
			continue
		}
		break
	}

	start := time.Now()
	runProg(t, 60*time.Second, lines.Bytes(), pub, "-h", host, "-p", mport, "-i", "meshlet-pub", "-t", topic, "-q", "1", "-l")
	runProg(t, 30*time.Second, []byte(bigMsg), pub, "-h", host, "-p", mport, "-i", "meshlet-pub-big", "-t", topic, "-q", "1", "-s")
	select {
	case <-done:
	case <-subExited:
		t.Fatalf("mosquitto_sub exited early: %s", stderr.String())
	case <-time.After(60 * time.Second):
		t.Fatal("mosquitto_sub: not every message 60s after publishing")
	}
	// Anything more (a duplicate) would show within a moment.
	time.Sleep(200 * time.Millisecond)
	_ = cmd.Process.Signal(syscall.SIGTERM)
	<-subExited
	elapsed := time.Since(start)
	seen := map[string]bool{}
	for _, m := range msgs {
		qos, payload, _ := strings.Cut(m, " ")
		if qos != "1" {
			t.Errorf("message delivered with QoS %s, want 1: %.40q", qos, payload)
		}
		if !want[payload] {
			t.Errorf("unexpected or corrupted message (%d bytes): %.60q", len(payload), payload)
		}
		if seen[payload] {
			t.Errorf("message delivered twice: %.40q", payload)
		}
		seen[payload] = true
	}
	if len(seen) != len(want) {
		t.Fatalf("subscriber received %d distinct messages, want %d", len(seen), len(want))
	}
	t.Logf("MQTT: %d QoS 1 messages (one of 256 KiB) published and received through the mesh in %v", len(want), elapsed.Round(time.Millisecond))

	// Retained: published through the mesh, then a new subscriber (also
	// through the mesh) gets it at once, flagged retained (%r = 1).
	retained := "retained-" + hex.EncodeToString(randomBytes(t, 8))
	runProg(t, 30*time.Second, nil, pub, "-h", host, "-p", mport, "-t", topic+"/state", "-q", "1", "-r", "-m", retained)
	out := strings.TrimSpace(runProg(t, 30*time.Second, nil, sub, "-h", host, "-p", mport, "-t", topic+"/state", "-q", "1",
		"-C", "1", "-W", "10", "-F", "%r %q %p"))
	if out != "1 1 "+retained {
		t.Fatalf("late subscriber got %q, want the retained message %q", out, "1 1 "+retained)
	}
	sanity.check(t, p, "after MQTT")
}

// pgbench reports of one run.
type pgbenchResult struct {
	tps       float64
	processed int
	failed    int
}

func parsePgbench(t *testing.T, out string) pgbenchResult {
	t.Helper()
	var r pgbenchResult
	found := 0
	for line := range strings.Lines(out) {
		line = strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(line, "tps = "):
			r.tps, _ = strconv.ParseFloat(strings.Fields(line)[2], 64)
			found++
		case strings.HasPrefix(line, "number of transactions actually processed: "):
			v := strings.TrimPrefix(line, "number of transactions actually processed: ")
			v, _, _ = strings.Cut(v, "/")
			r.processed, _ = strconv.Atoi(v)
			found++
		case strings.HasPrefix(line, "number of failed transactions: "):
			r.failed, _ = strconv.Atoi(strings.Fields(line)[4])
			found++
		}
	}
	if found != 3 {
		t.Fatalf("pgbench output not understood:\n%s", out)
	}
	return r
}

// TestOpaqueTCPPostgres: PostgreSQL behind the sidecars; pgbench -i loads
// its tables through the mesh, pgbench (TPC-B-like, 4 clients) runs through
// the mesh with zero failed transactions, a connection-per-transaction run
// (pgbench -C) opens and closes hundreds of mesh connections, and psql
// results through the mesh equal those read directly (100 000 rows
// included).
func TestOpaqueTCPPostgres(t *testing.T) {
	pgbench := debTool(t, "pgbench", "postgresql")
	psql := debTool(t, "psql", "postgresql-client")
	port := startPostgres(t)
	p := startPair(t, pairOptions{Protocol: "tcp", AppPort: port})
	direct := hostPort(port)
	sanity := startSanity()
	conn := func(addr string) []string {
		host, port, _ := net.SplitHostPort(addr)
		return []string{"-h", host, "-p", port, "-U", "postgres"}
	}
	query := func(addr, sql string) string {
		return runProg(t, 60*time.Second, nil, psql, append(conn(addr), "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-Atc", sql)...)
	}

	runProg(t, 120*time.Second, nil, pgbench, append(conn(p.Addr), "-i", "-q", "-s", "1", "postgres")...)
	if got := strings.TrimSpace(query(p.Addr, "SELECT count(*) FROM pgbench_accounts")); got != "100000" {
		t.Fatalf("pgbench_accounts loaded through the mesh has %s rows, want 100000", got)
	}
	rows := "SELECT aid, bid, abalance, filler FROM pgbench_accounts ORDER BY aid"
	if a, b := query(p.Addr, rows), query(direct, rows); a != b || len(a) < 100000*10 {
		t.Fatalf("100 000 rows through the mesh (%d bytes) differ from direct (%d bytes)", len(a), len(b))
	}

	bench := func(addr string, args ...string) pgbenchResult {
		out := runProg(t, 120*time.Second, nil, pgbench, append(append(conn(addr), args...), "postgres")...)
		r := parsePgbench(t, out)
		if r.failed != 0 || r.processed == 0 {
			t.Fatalf("pgbench %s via %s: %d failed, %d processed:\n%s", strings.Join(args, " "), addr, r.failed, r.processed, out)
		}
		return r
	}
	viaDirect := bench(direct, "-c", "4", "-j", "2", "-T", "4")
	viaMesh := bench(p.Addr, "-c", "4", "-j", "2", "-T", "4")
	t.Logf("pgbench -c 4 -j 2 -T 4 (TPC-B-like): through the mesh %.0f tps (%d transactions, 0 failed), direct %.0f tps: ratio %.2f",
		viaMesh.tps, viaMesh.processed, viaDirect.tps, viaMesh.tps/viaDirect.tps)
	churn := bench(p.Addr, "-C", "-S", "-c", "2", "-j", "2", "-t", "150")
	if churn.processed != 300 {
		t.Fatalf("pgbench -C through the mesh processed %d transactions, want 300", churn.processed)
	}
	t.Logf("pgbench -C -S (a new mesh connection per transaction): %d transactions, 0 failed, %.0f tps", churn.processed, churn.tps)
	if a, b := query(p.Addr, "SELECT sum(delta), count(*) FROM pgbench_history"), query(direct, "SELECT sum(delta), count(*) FROM pgbench_history"); a != b {
		t.Fatalf("pgbench_history through the mesh %q, direct %q", a, b)
	}
	sanity.check(t, p, "after pgbench")
}

// greeting dials addr and reads the MySQL/MariaDB server greeting (the
// handshake packet the server sends before the client says anything),
// returning the time from the start of the dial to the whole packet and
// the server version in it.
func greeting(addr string) (time.Duration, string, error) {
	start := time.Now()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		return 0, "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var hdr [4]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return time.Since(start), "", fmt.Errorf("reading the greeting header after %v: %w", time.Since(start), err)
	}
	body := make([]byte, int(hdr[0])|int(hdr[1])<<8|int(hdr[2])<<16)
	if _, err := io.ReadFull(c, body); err != nil {
		return time.Since(start), "", fmt.Errorf("reading the greeting: %w", err)
	}
	elapsed := time.Since(start)
	if len(body) < 2 || body[0] != 10 { // protocol version 10
		return elapsed, "", fmt.Errorf("not a protocol 10 greeting: % x", body[:min(len(body), 16)])
	}
	version, _, _ := bytes.Cut(body[1:], []byte{0})
	return elapsed, string(version), nil
}

// greetingTimes measures n greetings from addr, returning them sorted.
func greetingTimes(t *testing.T, addr string, n int) []time.Duration {
	t.Helper()
	var ds []time.Duration
	for range n {
		d, v, err := greeting(addr)
		if err != nil {
			t.Fatalf("greeting via %s: %v", addr, err)
		}
		if !strings.Contains(v, "MariaDB") {
			t.Fatalf("greeting via %s names server version %q", addr, v)
		}
		ds = append(ds, d)
	}
	slices.Sort(ds)
	return ds
}

// TestOpaqueTCPServerFirstMariaDB: MariaDB speaks first (the server's
// handshake packet precedes any client byte). Through both sidecars the
// greeting arrives promptly — no protocol sniffing waits for a client byte
// that never comes — and the mariadb client authenticates and runs DDL,
// DML and queries whose results equal those read directly.
func TestOpaqueTCPServerFirstMariaDB(t *testing.T) {
	client := debTool(t, "mariadb", "mariadb-client")
	port := startMariaDB(t)
	p := startPair(t, pairOptions{Protocol: "tcp", AppPort: port})
	direct := hostPort(port)
	sanity := startSanity()

	const n = 30
	viaDirect := greetingTimes(t, direct, n)
	viaMesh := greetingTimes(t, p.Addr, n)
	med := func(ds []time.Duration) time.Duration { return ds[len(ds)/2] }
	t.Logf("MariaDB greeting (dial to whole handshake packet, %d connections each): through the mesh median %v max %v; direct median %v max %v",
		n, med(viaMesh), viaMesh[n-1], med(viaDirect), viaDirect[n-1])
	if viaMesh[n-1] >= time.Second || med(viaMesh) >= 250*time.Millisecond {
		t.Fatalf("greeting through the mesh too slow (median %v, max %v): something waits for the client to speak first", med(viaMesh), viaMesh[n-1])
	}

	sql := func(addr, q string) string {
		return runProg(t, 30*time.Second, nil, client, mariaDBArgs(portOf(t, addr), q)...)
	}
	sql(p.Addr, "CREATE DATABASE mesh; CREATE TABLE mesh.items (id INT PRIMARY KEY, name VARCHAR(64), payload TEXT)")
	var insert strings.Builder
	insert.WriteString("INSERT INTO mesh.items VALUES ")
	for i := range 2000 {
		if i > 0 {
			insert.WriteString(",")
		}
		fmt.Fprintf(&insert, "(%d,'item-%d',REPEAT('x',%d))", i, i, i%500)
	}
	sql(p.Addr, insert.String())
	sql(p.Addr, "UPDATE mesh.items SET name = CONCAT(name, '-updated') WHERE id % 2 = 0; DELETE FROM mesh.items WHERE id >= 1500")
	if got := strings.TrimSpace(sql(p.Addr, "SELECT COUNT(*), SUM(LENGTH(payload)) FROM mesh.items")); got != "1500\t374250" {
		t.Fatalf("mesh.items through the mesh: %q", got)
	}
	all := "SELECT * FROM mesh.items ORDER BY id"
	if a, b := sql(p.Addr, all), sql(direct, all); a != b {
		t.Fatalf("rows through the mesh (%d bytes) differ from direct (%d bytes)", len(a), len(b))
	}
	sanity.check(t, p, "after MariaDB")
}

// TestOpaqueTCPHalfClose: a TCP half-close crosses both sidecars (as a TLS
// close_notify between them) in both directions, with the other direction
// still open:
//   - the client sends its whole request and shuts down its write side; the
//     server sees EOF, then answers, and the client gets the whole answer
//     (a Go client, and the real `nc -N`);
//   - the server sends its whole greeting and shuts down its write side (a
//     real `nc -N -l`); the client reads it to EOF, then sends its data, which
//     the server still receives in full before the client closes.
func TestOpaqueTCPHalfClose(t *testing.T) {
	nc := debTool(t, "nc.openbsd", "netcat-openbsd")

	t.Run("client closes its write side first", func(t *testing.T) {
		srv := startHalfCloseServer(t)
		p := startPair(t, pairOptions{Protocol: "tcp", AppPort: srv.port})
		sanity := startSanity()
		request := randomBytes(t, 1<<20)
		want := answerOf(request)

		c, err := net.Dial("tcp", p.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		if _, err := c.Write(request); err != nil {
			t.Fatal(err)
		}
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(c)
		if err != nil {
			t.Fatalf("reading the answer after our half-close: %v", err)
		}
		if string(got) != want {
			t.Fatalf("Go client got %q, want %q", got, want)
		}
		if r := srv.next(t); !r.sawEOF || r.n != len(request) {
			t.Fatalf("server read %d bytes, EOF %v; want %d and EOF", r.n, r.sawEOF, len(request))
		}

		// The same with a real client: nc -N shuts its socket's write side
		// down at the end of its input, then prints what comes back.
		out := runProg(t, 20*time.Second, request, nc, "-N", "127.0.0.1", strconv.Itoa(portOf(t, p.Addr)))
		if out != want {
			t.Fatalf("nc -N got %q, want %q", out, want)
		}
		if r := srv.next(t); !r.sawEOF || r.n != len(request) {
			t.Fatalf("server read %d bytes from nc, EOF %v", r.n, r.sawEOF)
		}
		sanity.check(t, p, "after half-close (client first)")
	})

	t.Run("server closes its write side first", func(t *testing.T) {
		greetingData := randomBytes(t, 1<<20)
		received, err := os.Create(t.TempDir() + "/received")
		if err != nil {
			t.Fatal(err)
		}
		defer received.Close()
		port := freePorts(t, 1)[0]
		// nc -N -l: sends its input, shuts its write side down, keeps
		// reading until the client's EOF into its output, then exits.
		cmd := exec.Command(nc, "-N", "-l", "127.0.0.1", strconv.Itoa(port))
		cmd.Stdin, cmd.Stdout = bytes.NewReader(greetingData), received
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		var ncErr procOutput
		cmd.Stderr = &ncErr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		ncExited := make(chan struct{})
		var ncWait error
		go func() {
			ncWait = cmd.Wait()
			close(ncExited)
		}()
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			<-ncExited
		})
		// nc -l serves a single connection: watch the socket table rather
		// than dial it.
		testutil.Until(t, 5*time.Second, "nc listening", func() bool { return listeningOn(t, port) })
		p := startPair(t, pairOptions{Protocol: "tcp", AppPort: port})
		sanity := startSanity()

		c, err := net.Dial("tcp", p.Addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(20 * time.Second))
		got, err := io.ReadAll(c) // to the server's half-close
		if err != nil {
			t.Fatalf("reading the greeting to EOF: %v", err)
		}
		if !bytes.Equal(got, greetingData) {
			t.Fatalf("greeting: got %d bytes, want %d (equal: false)", len(got), len(greetingData))
		}
		reply := randomBytes(t, 512<<10)
		if _, err := c.Write(reply); err != nil {
			t.Fatalf("writing after the server's half-close: %v", err)
		}
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-ncExited:
			if ncWait != nil {
				t.Fatalf("nc -N -l: %v: %s", ncWait, ncErr.String())
			}
		case <-time.After(20 * time.Second):
			t.Fatal("nc -N -l still running 20s after our half-close: it never saw EOF")
		}
		b, err := os.ReadFile(received.Name())
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, reply) {
			t.Fatalf("nc received %d bytes after its half-close, want the %d we sent", len(b), len(reply))
		}
		sanity.check(t, p, "after half-close (server first)")
	})
}

// halfCloseServer reads each connection to EOF, then answers with the size
// and SHA-256 of what it read, and closes.
type halfCloseServer struct {
	port    int
	results chan halfCloseResult
}

type halfCloseResult struct {
	n      int
	sawEOF bool
}

func answerOf(b []byte) string {
	sum := sha256.Sum256(b)
	return fmt.Sprintf("%d bytes sha256 %x\n", len(b), sum)
}

func startHalfCloseServer(t *testing.T) *halfCloseServer {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &halfCloseServer{port: l.Addr().(*net.TCPAddr).Port, results: make(chan halfCloseResult, 16)}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(30 * time.Second))
				b, err := io.ReadAll(c) // nil error: EOF, the client's half-close
				s.results <- halfCloseResult{n: len(b), sawEOF: err == nil}
				if err == nil {
					_, _ = io.WriteString(c, answerOf(b))
				}
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		wg.Wait()
	})
	return s
}

func (s *halfCloseServer) next(t *testing.T) halfCloseResult {
	t.Helper()
	select {
	case r := <-s.results:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("server saw no connection end")
		return halfCloseResult{}
	}
}

// listeningOn reports whether a socket listens on 127.0.0.1:port, from
// /proc/net/tcp (state 0A is LISTEN).
func listeningOn(t *testing.T, port int) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Fatal(err)
	}
	local := fmt.Sprintf("0100007F:%04X", port)
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) > 3 && f[1] == local && f[3] == "0A" {
			return true
		}
	}
	return false
}

func randomBytes(t *testing.T, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

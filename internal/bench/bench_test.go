package bench

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"math"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestParseWrk(t *testing.T) {
	tests := []struct {
		name       string
		out        string
		wantReqs   int64
		wantErrors int64
		wantP99    float64
		wantErr    bool
	}{
		{name: "clean", out: "Running 5s test\nMESHLET-WRK 1000 2000000 0 0 0 0 0 100 200 300 400\n", wantReqs: 1000, wantP99: 0.3},
		{name: "errors", out: "MESHLET-WRK 1000 1000000 2 3 4 5 6 100 200 300 400\n", wantReqs: 1002, wantErrors: 20, wantP99: 0.3},
		{name: "no summary", out: "Running 5s test\n", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r, err := parseWrk([]byte(tt.out))
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, want error %v", err, tt.wantErr)
			}
			if err != nil {
				return
			}
			if r.Requests != tt.wantReqs || r.Errors != tt.wantErrors || r.P99 != tt.wantP99 {
				t.Errorf("got %+v", r)
			}
		})
	}
}

func TestParseVegetaCSV(t *testing.T) {
	// timestamp (ns), code, latency (ns), bytes out, bytes in, error, body, ...
	out := "1000000000,200,1000000,0,1024,,,,0,GET,http://x/,\n" +
		"1500000000,200,2000000,0,1024,,,,1,GET,http://x/,\n" +
		"2000000000,0,0,0,0,\"dial tcp: connection refused, again\",,,2,GET,http://x/,\n"
	r, err := parseVegetaCSV([]byte(out), time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if r.Requests != 3 || r.Errors != 1 || r.P50 != 1 || r.P99 != 2 {
		t.Errorf("got %+v", r)
	}
	if !strings.Contains(r.ErrorSample, "connection refused, again") {
		t.Errorf("error sample %q", r.ErrorSample)
	}
	if r.Seconds != 1.5 { // 3 requests over 1 s of timestamps: 1.5 s at that pace
		t.Errorf("seconds = %v", r.Seconds)
	}
}

func TestParseGhz(t *testing.T) {
	rep := map[string]any{
		"count": 3, "total": int64(2 * time.Second),
		"details": []map[string]any{
			{"latency": int64(time.Millisecond), "status": "OK"},
			{"latency": int64(3 * time.Millisecond), "status": "OK"},
			{"latency": int64(time.Millisecond), "status": "Unavailable", "error": "rpc error"},
		},
	}
	b, _ := json.Marshal(rep)
	r, err := parseGhz(b)
	if err != nil {
		t.Fatal(err)
	}
	if r.Requests != 3 || r.Errors != 1 || r.Seconds != 2 || r.P50 != 1 || r.P99 != 3 || r.rps() != 1 {
		t.Errorf("got %+v (rps %v)", r, r.rps())
	}
}

func TestParseRedisCSV(t *testing.T) {
	out := `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"GET","50000.00","0.300","0.100","0.279","0.500","0.700","2.000"
`
	r, err := parseRedisCSV([]byte(out), 100000)
	if err != nil {
		t.Fatal(err)
	}
	if r.Requests != 100000 || r.Seconds != 2 || r.P50 != 0.279 || r.P99 != 0.7 || !math.IsNaN(r.P90) {
		t.Errorf("got %+v", r)
	}
	if _, err := parseRedisCSV([]byte(`"test","rps"`+"\n"), 1); err == nil {
		t.Error("no GET line: want an error")
	}
}

func TestProcParsers(t *testing.T) {
	stat := "1234 (my (odd) cmd) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 100 1000 200 18446744073709551615\n"
	if n, err := parseStatCPU([]byte(stat)); err != nil || n != 300 {
		t.Errorf("parseStatCPU = %d, %v; want 300", n, err)
	}
	status := "Name:\tsidecar\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\nRssAnon:\t    4096 kB\nRssFile:\t    6144 kB\nThreads:\t5\n"
	rss, hwm, anon, err := parseStatusMemory(strings.NewReader(status))
	if err != nil || rss != 10<<20 || hwm != 20<<20 || anon != 4<<20 {
		t.Errorf("parseStatusMemory = %d, %d, %d, %v", rss, hwm, anon, err)
	}
	procStat := "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 5 1 5 50 4 1 1 2 7 0\ncpu1 5 0 5 50 0 0 0 0 0 0\n"
	busy, total, err := parseCoreTicks([]byte(procStat), 0)
	if err != nil || busy != 15 || total != 69 {
		t.Errorf("parseCoreTicks = %d, %d, %v; want 15, 69", busy, total, err)
	}
	if _, _, err := parseCoreTicks([]byte(procStat), 7); err == nil {
		t.Error("cpu7: want an error")
	}
}

func TestPercentilesAndMedian(t *testing.T) {
	var lat []time.Duration
	for i := 1; i <= 1000; i++ {
		lat = append(lat, time.Duration(i)*time.Millisecond)
	}
	p50, p90, p99, p999 := percentiles(lat)
	if p50 != 500 || p90 != 900 || p99 != 990 || p999 != 999 {
		t.Errorf("percentiles = %v %v %v %v", p50, p90, p99, p999)
	}
	if p, _, _, _ := percentiles(nil); !math.IsNaN(p) {
		t.Errorf("no latencies: p50 %v, want NaN", p)
	}
	tests := []struct {
		name string
		in   []float64
		want float64
	}{
		{"odd", []float64{3, 1, 2}, 2},
		{"even", []float64{4, 1, 3, 2}, 2.5},
		{"one", []float64{7}, 7},
	}
	for _, tt := range tests {
		if got := median(tt.in); float64(got) != tt.want {
			t.Errorf("%s: median = %v, want %v", tt.name, got, tt.want)
		}
	}
	if median(nil).ok() {
		t.Error("median of nothing should be unknown")
	}
}

func TestNumJSON(t *testing.T) {
	b, err := json.Marshal(struct{ A, B num }{A: 1.23456789, B: nan})
	if err != nil || string(b) != `{"A":1.2346,"B":null}` {
		t.Errorf("got %s, %v", b, err)
	}
}

func TestReadResponse(t *testing.T) {
	body := strings.Repeat("x", 10)
	tests := []struct {
		name     string
		resp     string
		wantKeep bool
		wantErr  bool
	}{
		{"keep-alive", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n" + body, true, false},
		{"close", "HTTP/1.1 200 OK\r\ncontent-length: 10\r\nConnection: close\r\n\r\n" + body, false, false},
		{"status", "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", false, true},
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", false, true},
		{"short body", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nxx", false, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			keep, err := readResponse(bufio.NewReader(strings.NewReader(tt.resp)))
			if (err != nil) != tt.wantErr || (err == nil && keep != tt.wantKeep) {
				t.Errorf("keep %v, err %v; want keep %v, error %v", keep, err, tt.wantKeep, tt.wantErr)
			}
		})
	}
}

func TestOpenLoop(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, strings.Repeat("x", bodySize))
	}))
	defer srv.Close()
	start := time.Now()
	r, err := runOpenLoop(context.Background(), openLoopOptions{Addr: srv.Listener.Addr().String(), Rate: 1000, Duration: 300 * time.Millisecond, Connections: 4})
	if err != nil {
		t.Fatal(err)
	}
	if r.Requests != 300 || r.Errors != 0 {
		t.Errorf("%d requests, %d errors; want 300, 0 (%s)", r.Requests, r.Errors, r.ErrorSample)
	}
	if took := time.Since(start); took < 290*time.Millisecond || took > 2*time.Second {
		t.Errorf("took %v for 300 requests at 1,000/s", took)
	}
	if !(r.P50 > 0 && r.P50 <= r.P99 && r.P99 <= r.P999) {
		t.Errorf("percentiles %v %v %v", r.P50, r.P99, r.P999)
	}
}

func TestPeerConfigs(t *testing.T) {
	app := hostPort{"127.0.0.1", 9000}
	files := tlsPaths{cert: "/c.crt", key: "/c.key", certKey: "/c.pem", roots: "/r.pem"}
	for _, k := range []kind{kindHTTP, kindGRPC, kindRedis, kindConn, kindTLS} {
		h := haproxyConf(k, 8000, app, files)
		n := nginxConf("/tmp/x", k, 8000, app, files)
		for _, want := range []string{"nbthread 1", "bind 127.0.0.1:8000", "server app 127.0.0.1:9000"} {
			if !strings.Contains(h, want) {
				t.Errorf("haproxy kind %d: no %q in\n%s", k, want, h)
			}
		}
		for _, want := range []string{"worker_processes 1;", "listen 127.0.0.1:8000", "127.0.0.1:9000"} {
			if !strings.Contains(n, want) {
				t.Errorf("nginx kind %d: no %q in\n%s", k, want, n)
			}
		}
	}
	if h := haproxyConf(kindHTTP, 1, app, files); !strings.Contains(h, "http-reuse always") {
		t.Error("haproxy HTTP: no http-reuse always")
	}
	if n := nginxConf("/x", kindHTTP, 1, app, files); !strings.Contains(n, "keepalive 64;") || !strings.Contains(n, `proxy_set_header Connection "";`) {
		t.Error("nginx HTTP: no upstream keep-alive")
	}
	if a := appNginxConf("/x", 1); strings.Count(a, "x") < bodySize {
		t.Error("app: no 1 KiB body")
	}
}

// TestMesh translates and serves every sidecar's snapshot with the real
// translator and xDS server.
func TestMesh(t *testing.T) {
	apps := map[kind]hostPort{}
	for i, k := range []kind{kindHTTP, kindGRPC, kindRedis, kindConn, kindTLS} {
		apps[k] = hostPort{"127.0.0.1", 9000 + i}
	}
	apps[kindConn] = apps[kindHTTP]
	m, err := startMesh(apps, (&portAlloc{}).take)
	if err != nil {
		t.Fatal(err)
	}
	defer m.close()
	nodes := []string{nodeSingle, nodePairDown, nodePlainDown}
	for _, s := range meshServices {
		nodes = append(nodes, nodePairUp(s.name), nodePlainUp(s.name))
	}
	for _, n := range nodes {
		snap, err := m.srv.Cache.GetSnapshot(n)
		if err != nil {
			t.Errorf("%s: %v", n, err)
			continue
		}
		if len(snap.GetResources("type.googleapis.com/envoy.config.listener.v3.Listener")) == 0 {
			t.Errorf("%s: no listeners", n)
		}
		// Every node sends each service's traffic somewhere (the single
		// sidecar's apps once were client-only proxies: no endpoint).
		for name, r := range snap.GetResources("type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment") {
			if cla := r.(*endpointv3.ClusterLoadAssignment); len(cla.GetEndpoints()) == 0 || len(cla.GetEndpoints()[0].GetLbEndpoints()) == 0 {
				t.Errorf("%s: cluster %s has no endpoint", n, name)
			}
		}
	}
	if m.clientLeaf == nil || m.appLeaf == nil {
		t.Error("no leaves for the mTLS client and the TLS-terminating peers")
	}
}

package e2e

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/testutil"
	"github.com/meshlet/meshlet/sidecar/xdsclient"
)

// sidecarPair is the mesh path of one call: a downstream service "down"
// whose sidecar has an outbound listener for "up", and "up"'s sidecar in
// front of the app under test, with mTLS between the two sidecars, all
// configured from a real Consul agent by the control plane.
type sidecarPair struct {
	m *mesh
	// Addr is where a client of "up" connects: down's sidecar's outbound
	// listener for up (plaintext, loopback), as an app in the mesh would.
	Addr string
	// Down and Up are the two sidecars when they run in the test process;
	// UpPublic is up's sidecar's public listener (mTLS only).
	Down, Up *proxy
	UpPublic string
	// DownProc and UpProc are the sidecars when they run as bin/sidecar
	// processes (pairOptions.Processes), for memory figures.
	DownProc, UpProc *sidecarProc
}

// pairOptions shape startPair.
type pairOptions struct {
	// Protocol of "up": tcp, http, http2 or grpc (ServiceDefaults).
	Protocol string
	// AppPort is the port of the app under test on 127.0.0.1.
	AppPort int
	// Policies are extra policy documents (YAML, without "---").
	Policies []string
	// Processes runs the sidecars as separate bin/sidecar processes
	// (MESHLET_SIDECAR_BIN, else built once into a temporary directory), so
	// their resident memory can be read from /proc.
	Processes bool
}

// startPair starts Consul, the control plane and both sidecars, and waits
// until down's sidecar has up's sidecar as its only endpoint.
func startPair(t *testing.T, o pairOptions) *sidecarPair {
	t.Helper()
	m := newMesh(t)
	ports := freePorts(t, 4)
	downSidecar, upSidecar, bind, downApp := ports[0], ports[1], ports[2], ports[3]
	docs := append([]string{serviceDefaults("up", o.Protocol), serviceDefaults("down", "http")}, o.Policies...)
	m.writePolicy("pair.yaml", strings.Join(docs, "---\n"))
	m.startControlPlane("", "")
	// down's app is the test itself: nothing listens on its registered
	// port, and nothing dials it.
	m.register(svc{id: "down-1", name: "down", appPort: downApp, sidecarPort: downSidecar, upstreams: map[string]int{"up": bind}})
	m.register(svc{id: "up-1", name: "up", appPort: o.AppPort, sidecarPort: upSidecar})
	m.allow("down", "up")
	p := &sidecarPair{m: m, Addr: hostPort(bind), UpPublic: hostPort(upSidecar)}
	if o.Processes {
		p.DownProc = startSidecarProc(t, "down-1-sidecar-proxy", m.xdsAddr, m.credentials("down-1-sidecar-proxy"))
		p.UpProc = startSidecarProc(t, "up-1-sidecar-proxy", m.xdsAddr, m.credentials("up-1-sidecar-proxy"))
		testutil.Until(t, 15*time.Second, "sidecar processes ready", func() bool { return p.DownProc.ready() && p.UpProc.ready() })
		testutil.Until(t, 10*time.Second, "down's sidecar reaching up's", func() bool {
			return strings.Contains(p.DownProc.get(t, "/clusters"), "up::"+p.UpPublic+"::")
		})
		testutil.Until(t, 10*time.Second, "up's sidecar allowing down (the intention)", func() bool {
			return strings.Contains(p.UpProc.get(t, "/config_dump"), "/svc/down")
		})
		return p
	}
	p.Down = m.startSidecar("down-1-sidecar-proxy", "")
	p.Up = m.startSidecar("up-1-sidecar-proxy", "")
	p.Down.waitReady(t)
	p.Up.waitReady(t)
	testutil.Until(t, 10*time.Second, "down's sidecar reaching up's", func() bool {
		eps := p.Down.endpoints("up")
		return len(eps) == 1 && eps[0] == p.UpPublic
	})
	testutil.Until(t, 10*time.Second, "up's sidecar allowing down (the intention)", func() bool {
		return strings.Contains(getURL(t, p.Up.admin+"/config_dump"), "/svc/down")
	})
	return p
}

func getURL(t *testing.T, url string) string {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// sidecarProc is a sidecar running as its own process.
type sidecarProc struct {
	cmd   *exec.Cmd
	admin string // http://host:port
}

var sidecarBin struct {
	once sync.Once
	path string
	err  error
}

// sidecarBinary returns $MESHLET_SIDECAR_BIN, else a sidecar built once
// per test binary run.
func sidecarBinary(t *testing.T) string {
	t.Helper()
	skipShort(t, "sidecar processes")
	if p := os.Getenv("MESHLET_SIDECAR_BIN"); p != "" {
		return p
	}
	sidecarBin.once.Do(func() {
		dir, err := os.MkdirTemp("", "meshlet-sidecar-bin-")
		if err != nil {
			sidecarBin.err = err
			return
		}
		sidecarBin.path = filepath.Join(dir, "sidecar")
		out, err := exec.Command("go", "build", "-o", sidecarBin.path, "github.com/meshlet/meshlet/sidecar/cmd/sidecar").CombinedOutput()
		if err != nil {
			sidecarBin.err = fmt.Errorf("go build sidecar: %v\n%s", err, out)
		}
	})
	if sidecarBin.err != nil {
		t.Fatal(sidecarBin.err)
	}
	return sidecarBin.path
}

// startSidecarProc runs bin/sidecar for node against xdsAddr with creds
// (-xds-ca-file and -token-file); it is stopped (SIGTERM, then SIGKILL) at
// cleanup, its log shown on failure.
func startSidecarProc(t *testing.T, node, xdsAddr string, creds xdsclient.Credentials) *sidecarProc {
	t.Helper()
	admin := hostPort(freePorts(t, 1)[0])
	logf, err := os.Create(filepath.Join(t.TempDir(), node+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(sidecarBinary(t), "-node-id", node, "-xds-addr", xdsAddr, "-xds-ca-file", creds.CAFile, "-token-file", creds.TokenFile,
		"-admin-addr", admin, "-drain-timeout", "1s", "-admin-pprof")
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sp := &sidecarProc{cmd: cmd, admin: "http://" + admin}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("--- %s (process) log:\n%s", node, b)
		}
	})
	return sp
}

func (sp *sidecarProc) ready() bool {
	resp, err := http.Get(sp.admin + "/ready")
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func (sp *sidecarProc) get(t *testing.T, path string) string {
	t.Helper()
	resp, err := http.Get(sp.admin + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// memory returns the process's resident set now and at its peak (VmRSS,
// VmHWM from /proc/<pid>/status), in bytes.
func (sp *sidecarProc) memory(t *testing.T) (rss, peak int64) {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", sp.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		n, _ := strconv.ParseInt(fs[0], 10, 64)
		switch k {
		case "VmRSS":
			rss = n << 10
		case "VmHWM":
			peak = n << 10
		}
	}
	return rss, peak
}

// resetPeak resets the process's peak RSS (VmHWM), so a later memory() call
// reports the peak of what happened since (Linux clear_refs 5).
func (sp *sidecarProc) resetPeak(t *testing.T) {
	t.Helper()
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", sp.cmd.Process.Pid), []byte("5"), 0); err != nil {
		t.Fatalf("resetting the peak RSS: %v", err)
	}
}

package devjaeger_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/internal/devjaeger"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestTwoInstancesSideBySide starts two Jaegers at once: both must serve,
// listen only on their own 127.0.0.1 ports, and leave no process behind.
func TestTwoInstancesSideBySide(t *testing.T) {
	var js [2]*devjaeger.Jaeger
	for i := range js {
		js[i] = devjaeger.StartForTest(t)
	}
	if js[0].QueryURL == js[1].QueryURL || js[0].OTLPGRPCAddr == js[1].OTLPGRPCAddr {
		t.Fatalf("instances share ports: %+v / %+v", js[0], js[1])
	}
	for i, j := range js {
		t.Run(fmt.Sprintf("instance%d", i), func(t *testing.T) {
			resp, err := http.Get(j.QueryURL + "/api/services")
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("GET /api/services: %s", resp.Status)
			}
			http.DefaultClient.CloseIdleConnections()

			got, err := listeningAddrs(j.PID())
			if err != nil {
				t.Fatal(err)
			}
			want := []string{j.OTLPGRPCAddr, j.OTLPHTTPAddr, strings.TrimPrefix(j.QueryURL, "http://"), j.QueryGRPCAddr}
			slices.Sort(got)
			slices.Sort(want)
			if !slices.Equal(got, want) {
				t.Errorf("jaeger (pid %d) listens on %v, want exactly %v", j.PID(), got, want)
			}
		})
	}
	for i, j := range js {
		pid := j.PID()
		j.Stop()
		j.Stop() // idempotent
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("instance %d: pid %d still exists after Stop (kill 0: %v)", i, pid, err)
		}
		if _, err := os.Stat(j.ConfigPath); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("instance %d: config %s left behind (%v)", i, j.ConfigPath, err)
		}
	}
}

func TestFixedPorts(t *testing.T) {
	ports, err := devjaeger.FreePorts(3)
	if err != nil {
		t.Fatal(err)
	}
	j := devjaeger.StartForTestWith(t, devjaeger.Options{
		OTLPGRPCPort: ports[0], OTLPHTTPPort: ports[1], QueryPort: ports[2],
	})
	tests := []struct {
		name, got, want string
	}{
		{"otlp grpc", j.OTLPGRPCAddr, "127.0.0.1:" + strconv.Itoa(ports[0])},
		{"otlp http", j.OTLPHTTPAddr, "127.0.0.1:" + strconv.Itoa(ports[1])},
		{"query", j.QueryURL, "http://127.0.0.1:" + strconv.Itoa(ports[2])},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.got != tt.want {
				t.Errorf("got %q, want %q", tt.got, tt.want)
			}
		})
	}
}

func TestStartErrors(t *testing.T) {
	tests := []struct {
		name    string
		opts    devjaeger.Options
		wantErr string
	}{
		{
			name:    "missing binary",
			opts:    devjaeger.Options{Binary: filepath.Join(t.TempDir(), "no-such-jaeger")},
			wantErr: "devjaeger: start",
		},
		{
			name:    "binary exits at once",
			opts:    devjaeger.Options{Binary: "/bin/false", ReadyTimeout: 10 * time.Second},
			wantErr: "exited during start-up",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			j, err := devjaeger.Start(context.Background(), tt.opts)
			if err == nil {
				j.Stop()
				t.Fatal("Start succeeded")
			}
			if !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("error %q does not contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestFindBinaryEnv(t *testing.T) {
	t.Setenv(devjaeger.BinaryEnv, filepath.Join(t.TempDir(), "missing"))
	if _, err := devjaeger.FindBinary(); err == nil || !strings.Contains(err.Error(), devjaeger.BinaryEnv) {
		t.Errorf("FindBinary with a bad %s: err = %v", devjaeger.BinaryEnv, err)
	}
}

// listeningAddrs returns the "ip:port" of every listening TCP socket (IPv4
// and IPv6) that process pid holds, from /proc.
func listeningAddrs(pid int) ([]string, error) {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return nil, err
	}
	inodes := map[string]bool{}
	for _, fd := range fds {
		target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name()))
		if err == nil && strings.HasPrefix(target, "socket:[") {
			inodes[strings.TrimSuffix(strings.TrimPrefix(target, "socket:["), "]")] = true
		}
	}
	var addrs []string
	for _, table := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		f, err := os.Open(table)
		if err != nil {
			if errors.Is(err, os.ErrNotExist) {
				continue
			}
			return nil, err
		}
		sc := bufio.NewScanner(f)
		sc.Scan() // header
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			// sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
			if len(fields) < 10 || fields[3] != "0A" || !inodes[fields[9]] {
				continue
			}
			a, err := decodeProcAddr(fields[1])
			if err != nil {
				f.Close()
				return nil, err
			}
			addrs = append(addrs, a)
		}
		f.Close()
		if err := sc.Err(); err != nil {
			return nil, err
		}
	}
	return addrs, nil
}

// decodeProcAddr turns /proc/net/tcp's "0100007F:1F90" into "127.0.0.1:8080"
// (IPv6 entries are shown as hex, which never equals a wanted 127.0.0.1).
func decodeProcAddr(s string) (string, error) {
	host, port, ok := strings.Cut(s, ":")
	if !ok {
		return "", fmt.Errorf("bad address %q", s)
	}
	p, err := strconv.ParseUint(port, 16, 16)
	if err != nil {
		return "", err
	}
	if len(host) != 8 {
		return "[" + host + "]:" + strconv.FormatUint(p, 10), nil
	}
	v, err := strconv.ParseUint(host, 16, 32)
	if err != nil {
		return "", err
	}
	// Little-endian on the machines this runs on (amd64, arm64).
	return fmt.Sprintf("%d.%d.%d.%d:%d", v&0xff, v>>8&0xff, v>>16&0xff, v>>24, p), nil
}

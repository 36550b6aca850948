package policy

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/meshlet/meshlet/internal/golden"
	"github.com/meshlet/meshlet/internal/testutil"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func TestLoadValidDirectory(t *testing.T) {
	set, err := Load("testdata/valid")
	if err != nil {
		t.Fatalf("Load: %v", err)
	}
	got, err := json.MarshalIndent(set, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	golden.Check(t, "valid.golden.json", append(got, '\n'))
}

func TestInvalidFilesGiveFileLineFieldErrors(t *testing.T) {
	files, err := filepath.Glob("testdata/invalid/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no invalid cases: %v", err)
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		t.Run(name, func(t *testing.T) {
			data, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			set, err := Parse(map[string][]byte{f: data})
			if err == nil {
				t.Fatalf("Parse accepted %s: %+v", f, set)
			}
			if set != nil {
				t.Errorf("Parse returned a set with its error")
			}
			golden.Check(t, "invalid/"+name+".err", []byte(err.Error()+"\n"))
		})
	}
}

func TestProtocolLookup(t *testing.T) {
	set, err := Load("testdata/valid")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name, service, want string
		ok                  bool
	}{
		{name: "declared", service: "api", want: "http", ok: true},
		{name: "declared in upper case", service: "payments", want: "grpc", ok: true},
		{name: "defaults without protocol", service: "store", ok: false},
		{name: "no policy", service: "web", ok: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, ok := set.Protocol(tc.service)
			if string(got) != tc.want || ok != tc.ok {
				t.Errorf("Protocol(%q) = %q, %v; want %q, %v", tc.service, got, ok, tc.want, tc.ok)
			}
		})
	}
	var nilSet *Set
	if _, ok := nilSet.Protocol("api"); ok {
		t.Error("nil set declares a protocol")
	}
}

func TestServiceAccountMayActAs(t *testing.T) {
	set, err := Load("testdata/valid")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name                               string
		namespace, serviceAccount, service string
		want                               bool
	}{
		{name: "own name", namespace: "shop", serviceAccount: "web", service: "web", want: true},
		{name: "another service", namespace: "shop", serviceAccount: "web", service: "api", want: false},
		{name: "default ServiceAccount", namespace: "shop", serviceAccount: "default", service: "api", want: false},
		{name: "bound in its namespace", namespace: "shop", serviceAccount: "legacy", service: "store", want: true},
		{name: "bound in another namespace", namespace: "dev", serviceAccount: "legacy", service: "api", want: false},
		{name: "bound but not to that service", namespace: "shop", serviceAccount: "legacy", service: "web", want: false},
		{name: "bound in every namespace", namespace: "anywhere", serviceAccount: "batch", service: "report", want: true},
		{name: "no service", namespace: "shop", serviceAccount: "", service: "", want: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := set.ServiceAccountMayActAs(tc.namespace, tc.serviceAccount, tc.service); got != tc.want {
				t.Errorf("ServiceAccountMayActAs(%q, %q, %q) = %v, want %v", tc.namespace, tc.serviceAccount, tc.service, got, tc.want)
			}
		})
	}
	var nilSet *Set
	if !nilSet.ServiceAccountMayActAs("shop", "api", "api") || nilSet.ServiceAccountMayActAs("shop", "legacy", "api") {
		t.Error("nil set: want name equality only")
	}
}

func TestLoadMissingDirectoryIsEmpty(t *testing.T) {
	set, err := Load(filepath.Join(t.TempDir(), "nope"))
	if err != nil || len(set.ServiceDefaults) != 0 {
		t.Fatalf("Load(missing) = %+v, %v; want an empty set", set, err)
	}
}

func TestWatchAppliesEditsAndKeepsLastGoodSet(t *testing.T) {
	dir := t.TempDir()
	write := func(content string) {
		t.Helper()
		// Write then rename, as editors and Kubernetes ConfigMaps do.
		tmp := filepath.Join(dir, ".tmp")
		if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, filepath.Join(dir, "api.yaml")); err != nil {
			t.Fatal(err)
		}
	}
	doc := func(protocol string) string {
		return "apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: api}\nspec:\n  service: api\n  protocol: " + protocol + "\n"
	}
	write(doc("http"))

	var mu sync.Mutex
	var applied []string
	var logs strings.Builder
	logger := slog.New(slog.NewTextHandler(&syncWriter{w: &logs, mu: &mu}, nil))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Watch(ctx, dir, logger, func(s *Set) {
			p, _ := s.Protocol("api")
			mu.Lock()
			applied = append(applied, string(p))
			mu.Unlock()
		})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch: %v", err)
		}
	}()
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		testutil.Eventually(t, 5*time.Second, what, func() error {
			mu.Lock()
			defer mu.Unlock()
			if cond() {
				return nil
			}
			return fmt.Errorf("applied %v; logs:\n%s", applied, logs.String())
		})
	}
	waitFor("initial set", func() bool { return len(applied) == 1 && applied[0] == "http" })

	write(doc("htp"))
	waitFor("the error logged", func() bool { return strings.Contains(logs.String(), "spec.protocol") })
	mu.Lock()
	if len(applied) != 1 {
		t.Errorf("a broken edit was applied: %v", applied)
	}
	if !strings.Contains(logs.String(), `api.yaml:6: spec.protocol: unsupported protocol \"htp\"`) {
		t.Errorf("log lacks file:line:field error:\n%s", logs.String())
	}
	mu.Unlock()

	write(doc("grpc"))
	waitFor("the fixed set", func() bool { return len(applied) == 2 && applied[1] == "grpc" })
}

type syncWriter struct {
	w  io.Writer
	mu *sync.Mutex
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

// TestWatchFollowsConfigMapUpdates: a ConfigMap mounted as a volume is
// updated the way the kubelet's AtomicWriter does it (a new timestamped
// directory, the ..data symlink swapped by rename, the file names being
// symlinks through ..data); each update is applied.
func TestWatchFollowsConfigMapUpdates(t *testing.T) {
	dir := t.TempDir()
	gen := 0
	publish := func(content string) {
		t.Helper()
		gen++
		ts := fmt.Sprintf("..2026_12_04_00_00_%02d.%d", gen, gen)
		if err := os.Mkdir(filepath.Join(dir, ts), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, ts, "api.yaml"), []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		old, _ := os.Readlink(filepath.Join(dir, "..data"))
		if err := os.Symlink(ts, filepath.Join(dir, "..data_tmp")); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
			t.Fatal(err)
		}
		if gen == 1 {
			if err := os.Symlink("..data/api.yaml", filepath.Join(dir, "api.yaml")); err != nil {
				t.Fatal(err)
			}
		}
		if old != "" {
			if err := os.RemoveAll(filepath.Join(dir, old)); err != nil {
				t.Fatal(err)
			}
		}
	}
	doc := func(protocol string) string {
		return "apiVersion: meshlet.io/v1alpha1\nkind: ServiceDefaults\nmetadata: {name: api}\nspec:\n  service: api\n  protocol: " + protocol + "\n"
	}
	publish(doc("http"))
	applied := make(chan string, 10)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Watch(ctx, dir, slog.New(slog.NewTextHandler(io.Discard, nil)), func(s *Set) {
			p, _ := s.Protocol("api")
			applied <- string(p)
		})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch: %v", err)
		}
	}()
	for _, want := range []string{"http", "grpc", "tcp"} {
		if want != "http" {
			publish(doc(want))
		}
		select {
		case got := <-applied:
			if got != want {
				t.Fatalf("applied %q, want %q", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("update to %q not applied", want)
		}
	}
}

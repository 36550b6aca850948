// Package tools_test checks deploy/tools/deps.sh, the one place that
// installs what `make test`, `make demo` and `make bench` run.
package tools_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// deps runs deps.sh with args and extra environment, returning its output
// and exit code.
func deps(t *testing.T, env []string, args ...string) (string, int) {
	t.Helper()
	cmd := exec.Command("./deps.sh", args...)
	cmd.Env = append(os.Environ(), env...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.String(), 0
	case errors.As(err, &ee):
		return out.String(), ee.ExitCode()
	default:
		t.Fatalf("deps.sh %v: %v", args, err)
		return "", -1
	}
}

func TestDepsScript(t *testing.T) {
	if _, err := exec.LookPath("dpkg-query"); err != nil {
		t.Fatal("deps.sh needs dpkg-query (a Debian machine)")
	}
	t.Run("a no-op when everything is installed", func(t *testing.T) {
		// make test runs `deps.sh test` before the tests, so the test
		// group is complete here: the dry run finds nothing to do and
		// says nothing.
		out, code := deps(t, nil, "-n", "test", "demo")
		if code != 0 || out != "" {
			t.Errorf("deps.sh -n test demo: exit %d, output %q; want 0 and silence (run `make deps` first when running this test alone)", code, out)
		}
	})
	t.Run("names a missing Debian package", func(t *testing.T) {
		const pkg = "meshlet-deps-test-not-installed"
		out, code := deps(t, []string{"DEPS_EXTRA_PACKAGES=" + pkg}, "-n", "test")
		if code != 1 || !strings.Contains(out, "would apt-get install "+pkg) {
			t.Errorf("exit %d, output %q; want 1 and %q named", code, out, pkg)
		}
		if strings.Count(out, "\n") != 1 {
			t.Errorf("output %q: want only the missing package named", out)
		}
	})
	t.Run("names a missing Go tool", func(t *testing.T) {
		goBin, err := exec.LookPath("go")
		if err != nil {
			t.Fatal(err)
		}
		// A PATH without ghz and an empty GOBIN: ghz is missing.
		env := []string{"PATH=" + filepath.Dir(goBin) + ":/usr/sbin:/usr/bin:/sbin:/bin", "GOBIN=" + t.TempDir()}
		out, code := deps(t, env, "-n", "test")
		if code != 1 || !strings.Contains(out, "would go install github.com/bojand/ghz/cmd/ghz@") {
			t.Errorf("exit %d, output %q; want 1 and ghz named", code, out)
		}
	})
	t.Run("lint pins staticcheck", func(t *testing.T) {
		goBin, err := exec.LookPath("go")
		if err != nil {
			t.Fatal(err)
		}
		env := []string{"PATH=" + filepath.Dir(goBin) + ":/usr/sbin:/usr/bin:/sbin:/bin", "GOBIN=" + t.TempDir()}
		out, code := deps(t, env, "-n", "lint")
		if code != 1 || !strings.Contains(out, "would go install honnef.co/go/tools/cmd/staticcheck@v") {
			t.Errorf("exit %d, output %q; want 1 and staticcheck named with its version", code, out)
		}
	})
	t.Run("unknown group", func(t *testing.T) {
		out, code := deps(t, nil, "-n", "tset")
		if code != 2 || !strings.Contains(out, "unknown group tset") {
			t.Errorf("exit %d, output %q; want 2 naming the group", code, out)
		}
	})
}

// TestCIRunInstallsNothingItself: .ci/run runs the README's commands and
// leaves installing to them.
func TestCIRunInstallsNothingItself(t *testing.T) {
	b, err := os.ReadFile("../../.ci/run")
	if err != nil {
		t.Fatal(err)
	}
	install := regexp.MustCompile(`(?m)^[^#]*\b(apt-get|apt|dpkg|go install|pip|npm install)\b`)
	if m := install.Find(b); m != nil {
		t.Errorf(".ci/run installs on its own: %q; make test and make demo install what they need (deploy/tools/deps.sh)", m)
	}
	for _, cmd := range []string{"make lint", "make test", "make fuzz", "make demo", "make demo-k8s"} {
		if !bytes.Contains(b, []byte(cmd)) {
			t.Errorf(".ci/run does not run %q", cmd)
		}
	}
}

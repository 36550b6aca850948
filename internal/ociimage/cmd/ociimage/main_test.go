package main

import (
	"errors"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func TestRunWritesTheImage(t *testing.T) {
	dir := t.TempDir()
	src := filepath.Join(dir, "prog")
	if err := os.WriteFile(src, []byte("x"), 0o700); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "img.tar")
	err := run([]string{"-o", out, "-tag", "meshlet.local/x:1", "-file", src + ":/bin/prog:700",
		"-dir", "/tmp:1777", "-env", "A=1", "-label", "k=v", "-entrypoint", `["/bin/prog","serve"]`, "-cmd", "x", "-user", "1000"})
	if err != nil {
		t.Fatal(err)
	}
	img, err := tarball.ImageFromPath(out, nil)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	c := cf.Config
	if !reflect.DeepEqual(c.Entrypoint, []string{"/bin/prog", "serve"}) || !reflect.DeepEqual(c.Cmd, []string{"x"}) ||
		c.User != "1000" || c.Labels["k"] != "v" || c.Env[len(c.Env)-1] != "A=1" {
		t.Fatalf("config = %+v", c)
	}
}

func TestRunUsageErrors(t *testing.T) {
	for _, args := range [][]string{
		{},
		{"-o", "x.tar"},
		{"-o", "x.tar", "-tag", "a.local/x:1", "-file", "nocolon"},
		{"-o", "x.tar", "-tag", "a.local/x:1", "-dir", "/tmp:rwx"},
		{"-o", "x.tar", "-tag", "a.local/x:1", "-symlink", "/bin/x"},
		{"-o", "x.tar", "-tag", "a.local/x:1", "-symlink", "/bin/x:"},
		{"-o", "x.tar", "-tag", "a.local/x:1", "-entrypoint", "[broken"},
		{"-nosuchflag"},
	} {
		if err := run(args); !errors.Is(err, flag.ErrHelp) {
			t.Errorf("run(%q) = %v, want a usage error (exit 2)", args, err)
		}
	}
}

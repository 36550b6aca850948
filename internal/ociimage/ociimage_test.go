package ociimage

import (
	"archive/tar"
	"errors"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

type tarEntry struct {
	mode int64
	typ  byte
	uid  int
	data string
	link string
}

func TestWriteFileRoundTrip(t *testing.T) {
	dir := t.TempDir()
	prog := filepath.Join(dir, "prog")
	if err := os.WriteFile(prog, []byte("#!binary"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "img.tar")
	spec := Spec{
		Tag:        "meshlet.local/test:dev",
		Files:      []File{{Path: "/usr/local/bin/prog", Source: prog}, {Path: "/etc/motd", Data: []byte("hi\n")}},
		Dirs:       []Dir{{Path: "/tmp", Mode: 0o1777}},
		Symlinks:   []Symlink{{Path: "/usr/sbin/prog-alias", Target: "../local/bin/prog"}},
		Entrypoint: []string{"/usr/local/bin/prog"},
		Cmd:        []string{"serve"},
		Env:        []string{"A=1"},
		Labels:     map[string]string{"org.opencontainers.image.title": "test"},
	}
	if err := WriteFile(out, spec); err != nil {
		t.Fatal(err)
	}

	tags, err := Tags(out)
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"meshlet.local/test:dev"}; !reflect.DeepEqual(tags, want) {
		t.Fatalf("tags = %v, want %v", tags, want)
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
	if c.User != NonRootUser || c.WorkingDir != "/" || cf.OS != "linux" || cf.Architecture == "" {
		t.Errorf("user %q workdir %q os %q arch %q, want %q / linux <arch>", c.User, c.WorkingDir, cf.OS, cf.Architecture, NonRootUser)
	}
	if !reflect.DeepEqual(c.Entrypoint, spec.Entrypoint) || !reflect.DeepEqual(c.Cmd, spec.Cmd) {
		t.Errorf("entrypoint %v cmd %v, want %v %v", c.Entrypoint, c.Cmd, spec.Entrypoint, spec.Cmd)
	}
	if want := []string{"PATH=/usr/local/bin:/usr/bin:/bin", "A=1"}; !reflect.DeepEqual(c.Env, want) {
		t.Errorf("env = %v, want %v", c.Env, want)
	}
	if c.Labels["org.opencontainers.image.title"] != "test" {
		t.Errorf("labels = %v", c.Labels)
	}

	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 || len(cf.RootFS.DiffIDs) != 1 {
		t.Fatalf("%d layers, %d diff IDs; want 1 and 1", len(layers), len(cf.RootFS.DiffIDs))
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	got := map[string]tarEntry{}
	var order []string
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(tr)
		got[h.Name] = tarEntry{mode: h.Mode, typ: h.Typeflag, uid: h.Uid, data: string(b), link: h.Linkname}
		order = append(order, h.Name)
	}
	want := map[string]tarEntry{
		"etc/":                {mode: 0o755, typ: tar.TypeDir},
		"etc/motd":            {mode: 0o644, typ: tar.TypeReg, data: "hi\n"},
		"tmp/":                {mode: 0o1777, typ: tar.TypeDir},
		"usr/":                {mode: 0o755, typ: tar.TypeDir},
		"usr/local/":          {mode: 0o755, typ: tar.TypeDir},
		"usr/local/bin/":      {mode: 0o755, typ: tar.TypeDir},
		"usr/local/bin/prog":  {mode: 0o755, typ: tar.TypeReg, data: "#!binary"},
		"usr/sbin/":           {mode: 0o755, typ: tar.TypeDir},
		"usr/sbin/prog-alias": {mode: 0o777, typ: tar.TypeSymlink, link: "../local/bin/prog"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("layer entries:\n got %v\nwant %v", got, want)
	}
	// Parents come before their children, so extraction needs no reordering.
	for i, n := range order {
		for _, m := range order[i+1:] {
			if strings.HasPrefix(n, m) && strings.HasSuffix(m, "/") {
				t.Errorf("%s comes before its parent %s", n, m)
			}
		}
	}
}

func TestImageIsReproducible(t *testing.T) {
	spec := Spec{Tag: "meshlet.local/r:1", Files: []File{{Path: "/x", Data: []byte("x")}}}
	a, err := Image(spec)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Image(spec)
	if err != nil {
		t.Fatal(err)
	}
	da, _ := a.Digest()
	db, _ := b.Digest()
	if da != db {
		t.Fatalf("digests differ: %v %v", da, db)
	}
	spec.Files[0].Data = []byte("y")
	c, err := Image(spec)
	if err != nil {
		t.Fatal(err)
	}
	if dc, _ := c.Digest(); dc == da {
		t.Fatalf("different content, same digest %v", dc)
	}
}

func TestValidate(t *testing.T) {
	ok := File{Path: "/x", Data: []byte("x")}
	tests := []struct {
		name string
		spec Spec
		want string
	}{
		{"no tag", Spec{Files: []File{ok}}, "tag is required"},
		{"bad tag", Spec{Tag: "UPPER/x:1", Files: []File{ok}}, "tag"},
		{"no files", Spec{Tag: "a.local/x:1"}, "no files"},
		{"relative path", Spec{Tag: "a.local/x:1", Files: []File{{Path: "x"}}}, "must be absolute"},
		{"duplicate", Spec{Tag: "a.local/x:1", Files: []File{ok, ok}}, "given twice"},
		{"both sources", Spec{Tag: "a.local/x:1", Files: []File{{Path: "/y", Source: "/etc/hostname", Data: []byte{1}}}}, "both Source and Data"},
		{"file is a dir", Spec{Tag: "a.local/x:1", Files: []File{{Path: "/d/f", Data: []byte{1}}, {Path: "/d", Data: []byte{1}}}}, "both a file and a directory"},
		{"file is a dir, parent first", Spec{Tag: "a.local/x:1", Files: []File{{Path: "/d", Data: []byte{1}}, {Path: "/d/f", Data: []byte{1}}}}, "both a file and a directory"},
		{"symlink without target", Spec{Tag: "a.local/x:1", Files: []File{ok}, Symlinks: []Symlink{{Path: "/l"}}}, `symlink "/l": no target`},
		{"symlink over a file", Spec{Tag: "a.local/x:1", Files: []File{ok}, Symlinks: []Symlink{{Path: "/x", Target: "y"}}}, "given twice"},
		{"symlink is a dir", Spec{Tag: "a.local/x:1", Files: []File{{Path: "/l/f", Data: []byte{1}}}, Symlinks: []Symlink{{Path: "/l", Target: "y"}}}, "both a symlink and a directory"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := Image(tt.spec)
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.HasPrefix(err.Error(), "ociimage: ") {
				t.Fatalf("err = %v, want one containing %q", err, tt.want)
			}
		})
	}
	if _, err := Image(Spec{Tag: "a.local/x:1", Files: []File{{Path: "/x", Source: "/nonexistent/file"}}}); err == nil || !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("missing source: err = %v, want ErrNotExist", err)
	}
}

// Package ociimage builds container images from files on the host, without a
// Docker daemon or a registry, and writes them as image tarballs that
// `ctr images import` and `docker load` read.
//
// An image is one layer on the empty base (FROM scratch): the files of a
// Spec, their parent directories, and a config with entrypoint, user, env
// and working directory. Builds are reproducible: every timestamp is the Unix
// epoch and owners are 0:0, so the same files give the same digests. It uses
// github.com/google/go-containerregistry (tarball.LayerFromOpener,
// mutate.AppendLayers on empty.Image, mutate.ConfigFile,
// tarball.WriteToFile), the shape of ko's and crane's "append" images.
package ociimage

import (
	"archive/tar"
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"runtime"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// NonRootUser is the default Spec.User: uid and gid 65532, distroless's
// "nonroot", the user of the project's Dockerfile.
const NonRootUser = "65532:65532"

// File is one regular file in the image.
type File struct {
	// Path is the absolute path in the image, e.g. "/usr/local/bin/sidecar".
	Path string
	// Source is a file on the host whose content is copied. When empty,
	// Data is the content.
	Source string
	// Data is the content when Source is empty.
	Data []byte
	// Mode is the permission bits; 0 means 0o755 for a Source file (a
	// program) and 0o644 for Data.
	Mode fs.FileMode
}

// Dir is a directory in the image with explicit permissions, e.g.
// {"/tmp", 0o1777}. Parents of files need not be listed: they are added
// with 0o755.
type Dir struct {
	// Path is the absolute path in the image.
	Path string
	// Mode is the permission bits, sticky bit included (fs.ModeSticky or
	// 0o1000).
	Mode fs.FileMode
}

// Symlink is a symbolic link in the image, e.g. {"/usr/sbin/iptables-nft",
// "xtables-nft-multi"} (a multi-call binary's name). Parents of Path are
// added with 0o755 like those of files.
type Symlink struct {
	// Path is the absolute path of the link in the image.
	Path string
	// Target is what the link points to, relative to its directory or
	// absolute; not checked to exist. Required.
	Target string
}

// Spec describes an image.
type Spec struct {
	// Tag names the image in the tarball, e.g. "meshlet.local/meshlet:dev"
	// (a docker reference with a tag; a registry host that contains a dot
	// keeps containerd from prefixing docker.io/). Required.
	Tag string
	// Files are the image's regular files. At least one is required.
	Files []File
	// Dirs are directories with explicit permissions (optional).
	Dirs []Dir
	// Symlinks are symbolic links (optional).
	Symlinks []Symlink
	// Entrypoint and Cmd are the config's ENTRYPOINT and CMD; both may be
	// empty (then a pod names its command).
	Entrypoint []string
	Cmd        []string
	// Env is KEY=VALUE pairs; PATH defaults to
	// /usr/local/bin:/usr/bin:/bin when not given.
	Env []string
	// User is "uid[:gid]"; NonRootUser when empty. "0" runs as root.
	User string
	// WorkingDir defaults to "/".
	WorkingDir string
	// Labels become the config's labels (optional).
	Labels map[string]string
	// OS and Architecture default to "linux" and runtime.GOARCH.
	OS           string
	Architecture string
}

func (s *Spec) defaults() {
	if s.User == "" {
		s.User = NonRootUser
	}
	if s.WorkingDir == "" {
		s.WorkingDir = "/"
	}
	if s.OS == "" {
		s.OS = "linux"
	}
	if s.Architecture == "" {
		s.Architecture = runtime.GOARCH
	}
	hasPath := false
	for _, e := range s.Env {
		hasPath = hasPath || strings.HasPrefix(e, "PATH=")
	}
	if !hasPath {
		s.Env = append([]string{"PATH=/usr/local/bin:/usr/bin:/bin"}, s.Env...)
	}
}

// Validate reports the first problem of s: a missing or malformed tag, no
// files, a relative or duplicate path, a file with both Source and Data, a
// symlink without a target.
func (s *Spec) Validate() error {
	if s.Tag == "" {
		return errors.New("ociimage: spec: tag is required")
	}
	if _, err := name.NewTag(s.Tag, name.StrictValidation); err != nil {
		return fmt.Errorf("ociimage: spec: tag %q: %w", s.Tag, err)
	}
	if len(s.Files) == 0 {
		return errors.New("ociimage: spec: no files")
	}
	seen := map[string]bool{}
	check := func(p string) error {
		if !path.IsAbs(p) || path.Clean(p) != p || p == "/" {
			return fmt.Errorf("ociimage: spec: path %q: must be absolute and clean", p)
		}
		if seen[p] {
			return fmt.Errorf("ociimage: spec: path %q given twice", p)
		}
		seen[p] = true
		return nil
	}
	for _, f := range s.Files {
		if err := check(f.Path); err != nil {
			return err
		}
		if f.Source != "" && f.Data != nil {
			return fmt.Errorf("ociimage: spec: file %q: both Source and Data set", f.Path)
		}
	}
	for _, d := range s.Dirs {
		if err := check(d.Path); err != nil {
			return err
		}
	}
	for _, l := range s.Symlinks {
		if err := check(l.Path); err != nil {
			return err
		}
		if l.Target == "" {
			return fmt.Errorf("ociimage: spec: symlink %q: no target", l.Path)
		}
	}
	return nil
}

// epoch is every entry's timestamp, for reproducible digests.
var epoch = time.Unix(0, 0).UTC()

// Image builds the image of s: one layer on the empty base. Source files are
// read now. Errors name the file or field at fault.
func Image(s Spec) (v1.Image, error) {
	s.defaults()
	if err := s.Validate(); err != nil {
		return nil, err
	}
	layerTar, err := layerTar(s)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	})
	if err != nil {
		return nil, fmt.Errorf("ociimage: layer: %w", err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		return nil, fmt.Errorf("ociimage: append layer: %w", err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("ociimage: config: %w", err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = s.OS, s.Architecture
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = s.Entrypoint
	cf.Config.Cmd = s.Cmd
	cf.Config.Env = s.Env
	cf.Config.User = s.User
	cf.Config.WorkingDir = s.WorkingDir
	cf.Config.Labels = s.Labels
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		return nil, fmt.Errorf("ociimage: set config: %w", err)
	}
	return img, nil
}

// WriteFile builds the image of s and writes it to path as an image tarball
// (docker-archive format: manifest.json with RepoTags = [s.Tag], the config
// and one gzip layer), which `ctr -n k8s.io images import` and `docker load`
// read. The file is written in place; errors leave no file behind.
func WriteFile(path string, s Spec) error {
	img, err := Image(s)
	if err != nil {
		return err
	}
	tag, err := name.NewTag(s.Tag, name.StrictValidation)
	if err != nil {
		return fmt.Errorf("ociimage: tag %q: %w", s.Tag, err)
	}
	if err := tarball.WriteToFile(path, tag, img); err != nil {
		_ = os.Remove(path)
		return fmt.Errorf("ociimage: write %s: %w", path, err)
	}
	return nil
}

// Tags returns the references an image tarball at path names (its
// manifest.json RepoTags, in order), e.g. ["meshlet.local/pause:dev"].
func Tags(path string) ([]string, error) {
	m, err := tarball.LoadManifest(func() (io.ReadCloser, error) { return os.Open(path) })
	if err != nil {
		return nil, fmt.Errorf("ociimage: read manifest of %s: %w", path, err)
	}
	var tags []string
	for _, d := range m {
		tags = append(tags, d.RepoTags...)
	}
	if len(tags) == 0 {
		return nil, fmt.Errorf("ociimage: %s names no image", path)
	}
	return tags, nil
}

// layerTar returns the uncompressed layer: parent directories (0o755), the
// explicit directories, the files and the symlinks, sorted by path, owned
// by 0:0.
func layerTar(s Spec) ([]byte, error) {
	dirs := map[string]fs.FileMode{}
	addParents := func(p string) {
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			if _, ok := dirs[d]; !ok {
				dirs[d] = 0o755
			}
		}
	}
	for _, d := range s.Dirs {
		addParents(d.Path)
		dirs[d.Path] = d.Mode
	}
	for _, f := range s.Files {
		addParents(f.Path)
	}
	for _, l := range s.Symlinks {
		addParents(l.Path)
	}
	for _, f := range s.Files {
		if _, ok := dirs[f.Path]; ok {
			return nil, fmt.Errorf("ociimage: %s is both a file and a directory", f.Path)
		}
	}
	for _, l := range s.Symlinks {
		if _, ok := dirs[l.Path]; ok {
			return nil, fmt.Errorf("ociimage: %s is both a symlink and a directory", l.Path)
		}
	}
	type entry struct {
		path string
		dir  bool
		mode fs.FileMode
		file *File
		link string // symlink target
	}
	var entries []entry
	for p, m := range dirs {
		entries = append(entries, entry{path: p, dir: true, mode: m})
	}
	for i := range s.Files {
		f := &s.Files[i]
		entries = append(entries, entry{path: f.Path, mode: f.Mode, file: f})
	}
	for _, l := range s.Symlinks {
		entries = append(entries, entry{path: l.Path, link: l.Target})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].path < entries[j].path })

	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := &tar.Header{
			Name:    strings.TrimPrefix(e.path, "/"),
			ModTime: epoch,
			Format:  tar.FormatPAX,
		}
		if e.dir {
			h.Typeflag = tar.TypeDir
			h.Name += "/"
			h.Mode = tarMode(e.mode)
			if err := tw.WriteHeader(h); err != nil {
				return nil, fmt.Errorf("ociimage: tar %s: %w", e.path, err)
			}
			continue
		}
		if e.link != "" {
			h.Typeflag = tar.TypeSymlink
			h.Linkname = e.link
			h.Mode = 0o777
			if err := tw.WriteHeader(h); err != nil {
				return nil, fmt.Errorf("ociimage: tar %s: %w", e.path, err)
			}
			continue
		}
		data, mode := e.file.Data, e.mode
		if e.file.Source != "" {
			b, err := os.ReadFile(e.file.Source)
			if err != nil {
				return nil, fmt.Errorf("ociimage: file %s: %w", e.path, err)
			}
			data = b
			if mode == 0 {
				mode = 0o755
			}
		} else if mode == 0 {
			mode = 0o644
		}
		h.Typeflag = tar.TypeReg
		h.Mode = tarMode(mode)
		h.Size = int64(len(data))
		if err := tw.WriteHeader(h); err != nil {
			return nil, fmt.Errorf("ociimage: tar %s: %w", e.path, err)
		}
		if _, err := tw.Write(data); err != nil {
			return nil, fmt.Errorf("ociimage: tar %s: %w", e.path, err)
		}
	}
	if err := tw.Close(); err != nil {
		return nil, fmt.Errorf("ociimage: tar: %w", err)
	}
	return buf.Bytes(), nil
}

// tarMode converts fs.FileMode permission and sticky/setuid bits to the
// tar header's c_mode bits.
func tarMode(m fs.FileMode) int64 {
	mode := int64(m.Perm())
	if m&fs.ModeSticky != 0 {
		mode |= 0o1000
	}
	if m&fs.ModeSetgid != 0 {
		mode |= 0o2000
	}
	if m&fs.ModeSetuid != 0 {
		mode |= 0o4000
	}
	return mode | int64(m&0o7000) // raw octal bits given as 0o1777 etc.
}

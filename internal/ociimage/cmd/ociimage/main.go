// Command ociimage writes a container image tarball from files on the host,
// without a Docker daemon (internal/ociimage). `make images` uses it for the
// images the dev cluster imports:
//
//	ociimage -o bin/images/meshlet.tar -tag meshlet.local/meshlet:dev \
//	    -file bin/static/controlplane:/usr/local/bin/controlplane \
//	    -file bin/static/sidecar:/usr/local/bin/sidecar \
//	    -dir /tmp:1777 -entrypoint '["/usr/local/bin/sidecar"]'
//
// `make image` adds Debian's iptables to the meshlet image with the flags
// deploy/tools/xtables-files.sh prints (-file for the binaries, libraries
// and plugins, -symlink for the multi-call names).
//
// Exit status 2 for bad flags, 1 when the image cannot be written.
package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"strconv"
	"strings"

	"github.com/meshlet/meshlet/internal/ociimage"
)

// list is a repeatable string flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "ociimage:", err)
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(2)
		}
		os.Exit(1)
	}
}

func run(args []string) error {
	fl := flag.NewFlagSet("ociimage", flag.ContinueOnError)
	var files, dirs, links, env, labels list
	out := fl.String("o", "", "output tarball (required)")
	tag := fl.String("tag", "", "image reference, e.g. meshlet.local/meshlet:dev (required)")
	fl.Var(&files, "file", "SRC:DST[:MODE] host file SRC at image path DST, MODE octal (default 755); repeatable")
	fl.Var(&dirs, "dir", "PATH:MODE a directory with octal MODE, e.g. /tmp:1777; repeatable")
	fl.Var(&links, "symlink", "PATH:TARGET a symbolic link at image path PATH to TARGET, e.g. /usr/sbin/iptables-nft:xtables-nft-multi; repeatable")
	fl.Var(&env, "env", "KEY=VALUE; repeatable (PATH defaults to /usr/local/bin:/usr/bin:/bin)")
	fl.Var(&labels, "label", "KEY=VALUE config label; repeatable")
	entrypoint := fl.String("entrypoint", "", `ENTRYPOINT: a JSON array (["/bin/x","arg"]) or one path; empty for none`)
	cmd := fl.String("cmd", "", "CMD: a JSON array or one word; empty for none")
	user := fl.String("user", ociimage.NonRootUser, "uid[:gid] the image runs as")
	workdir := fl.String("workdir", "/", "working directory")
	if err := fl.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return err
		}
		return fmt.Errorf("%w: %w", err, flag.ErrHelp) // a usage error: exit 2
	}
	if *out == "" || *tag == "" || fl.NArg() != 0 {
		fl.Usage()
		return fmt.Errorf("-o and -tag are required, and no arguments: %w", flag.ErrHelp)
	}
	s := ociimage.Spec{Tag: *tag, Env: env, User: *user, WorkingDir: *workdir}
	for _, f := range files {
		parts := strings.Split(f, ":")
		if len(parts) < 2 || len(parts) > 3 {
			return fmt.Errorf("-file %q: want SRC:DST[:MODE]: %w", f, flag.ErrHelp)
		}
		file := ociimage.File{Source: parts[0], Path: parts[1]}
		if len(parts) == 3 {
			m, err := strconv.ParseUint(parts[2], 8, 32)
			if err != nil {
				return fmt.Errorf("-file %q: mode: %w", f, flag.ErrHelp)
			}
			file.Mode = fs.FileMode(m)
		}
		s.Files = append(s.Files, file)
	}
	for _, d := range dirs {
		p, m, ok := strings.Cut(d, ":")
		mode, err := strconv.ParseUint(m, 8, 32)
		if !ok || err != nil {
			return fmt.Errorf("-dir %q: want PATH:MODE (octal): %w", d, flag.ErrHelp)
		}
		s.Dirs = append(s.Dirs, ociimage.Dir{Path: p, Mode: fs.FileMode(mode)})
	}
	for _, l := range links {
		p, target, ok := strings.Cut(l, ":")
		if !ok || target == "" {
			return fmt.Errorf("-symlink %q: want PATH:TARGET: %w", l, flag.ErrHelp)
		}
		s.Symlinks = append(s.Symlinks, ociimage.Symlink{Path: p, Target: target})
	}
	for _, l := range labels {
		k, v, ok := strings.Cut(l, "=")
		if !ok {
			return fmt.Errorf("-label %q: want KEY=VALUE: %w", l, flag.ErrHelp)
		}
		if s.Labels == nil {
			s.Labels = map[string]string{}
		}
		s.Labels[k] = v
	}
	var err error
	if s.Entrypoint, err = words("-entrypoint", *entrypoint); err != nil {
		return err
	}
	if s.Cmd, err = words("-cmd", *cmd); err != nil {
		return err
	}
	if err := ociimage.WriteFile(*out, s); err != nil {
		return err
	}
	fmt.Printf("ociimage: wrote %s (%s)\n", *out, *tag)
	return nil
}

// words parses a JSON array of strings, or one word.
func words(flagName, v string) ([]string, error) {
	if v == "" {
		return nil, nil
	}
	if !strings.HasPrefix(v, "[") {
		return []string{v}, nil
	}
	var w []string
	if err := json.Unmarshal([]byte(v), &w); err != nil {
		return nil, fmt.Errorf("%s %q: %w: %w", flagName, v, err, flag.ErrHelp)
	}
	return w, nil
}

package policy

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Load reads every *.yaml and *.yml file directly in dir (hidden files and
// subdirectories are skipped), validates all documents and returns the Set.
// A missing or empty directory gives an empty Set. On any problem it returns
// a nil Set and an Errors value listing every problem found, each with file,
// line and field.
func Load(dir string) (*Set, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return newSet(), nil
	}
	if err != nil {
		return nil, Errors{{File: dir, Msg: err.Error()}}
	}
	files := map[string][]byte{}
	var errs Errors
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || strings.HasPrefix(name, ".") || !isPolicyFile(name) {
			continue
		}
		path := filepath.Join(dir, name)
		data, err := os.ReadFile(path)
		if err != nil {
			errs = append(errs, &Error{File: path, Msg: err.Error()})
			continue
		}
		files[path] = data
	}
	set, perr := Parse(files)
	if perr != nil {
		var pe Errors
		errors.As(perr, &pe)
		errs = append(errs, pe...)
	}
	if len(errs) > 0 {
		return nil, errs
	}
	return set, nil
}

func isPolicyFile(name string) bool {
	return strings.HasSuffix(name, ".yaml") || strings.HasSuffix(name, ".yml")
}

// Parse validates the documents of a set of files (path → content) as one
// Set, as Load does for a directory. It returns Errors on any problem.
func Parse(files map[string][]byte) (*Set, error) {
	set := newSet()
	v := &validator{}
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	names := map[string]Source{} // kind/name → first definition
	for _, path := range paths {
		set.Files = append(set.Files, path)
		v.file = path
		dec := yaml.NewDecoder(bytes.NewReader(files[path]))
		for {
			var doc yaml.Node
			err := dec.Decode(&doc)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				v.syntax(err)
				break
			}
			v.document(&doc, set, names)
		}
	}
	if len(v.errs) > 0 {
		slices.SortStableFunc(v.errs, func(a, b *Error) int {
			if c := strings.Compare(a.File, b.File); c != 0 {
				return c
			}
			return a.Line - b.Line
		})
		return nil, v.errs
	}
	return set, nil
}

// envelope is the Kubernetes-shaped frame of every document.
type envelope struct {
	APIVersion string    `yaml:"apiVersion"`
	Kind       string    `yaml:"kind"`
	Metadata   Metadata  `yaml:"metadata"`
	Spec       yaml.Node `yaml:"spec"`
}

// validator accumulates errors for one Parse, with the line index of the
// document being checked.
type validator struct {
	file    string
	docLine int
	lines   map[string]int // dotted field path → line, for the current document
	errs    Errors
}

// errorf records a problem with field (a dotted path), located at the
// field's line or, failing that, its nearest parent's.
func (v *validator) errorf(field, format string, args ...any) {
	v.errs = append(v.errs, &Error{File: v.file, Line: v.lineOf(field), Field: field, Msg: fmt.Sprintf(format, args...)})
}

func (v *validator) lineOf(field string) int {
	for f := field; f != ""; {
		if l, ok := v.lines[f]; ok {
			return l
		}
		i := strings.LastIndexAny(f, ".[")
		if i < 0 {
			break
		}
		f = f[:i]
	}
	return v.docLine
}

// fieldAt returns the deepest field path that starts on line, or "".
func (v *validator) fieldAt(line int) string {
	best := ""
	for f, l := range v.lines {
		if l == line && len(f) > len(best) {
			best = f
		}
	}
	return best
}

var yamlLineRE = regexp.MustCompile(`^(?:yaml: )?line (\d+): (.*)$`)

// syntax records a YAML syntax error, which stops the file.
func (v *validator) syntax(err error) {
	msg := err.Error()
	line := 0
	if m := yamlLineRE.FindStringSubmatch(msg); m != nil {
		line, _ = strconv.Atoi(m[1])
		msg = m[2]
	}
	v.errs = append(v.errs, &Error{File: v.file, Line: line, Msg: "invalid YAML: " + msg})
}

// decode decodes node into out, turning YAML type errors into field errors.
func (v *validator) decode(node *yaml.Node, out any, prefix string) bool {
	err := node.Decode(out)
	if err == nil {
		return true
	}
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		v.errs = append(v.errs, &Error{File: v.file, Line: node.Line, Field: prefix, Msg: err.Error()})
		return false
	}
	for _, e := range te.Errors {
		line, msg := node.Line, e
		if m := yamlLineRE.FindStringSubmatch(e); m != nil {
			line, _ = strconv.Atoi(m[1])
			msg = m[2]
		}
		field := v.fieldAt(line)
		if field == "" {
			field = prefix
		}
		v.errs = append(v.errs, &Error{File: v.file, Line: line, Field: field, Msg: msg})
	}
	return false
}

// document validates one YAML document and adds it to set.
func (v *validator) document(doc *yaml.Node, set *Set, names map[string]Source) {
	if doc.Kind == 0 || (doc.Kind == yaml.DocumentNode && len(doc.Content) == 0) {
		return // empty document, e.g. a trailing "---"
	}
	root := doc
	if root.Kind == yaml.DocumentNode {
		root = root.Content[0]
	}
	if root.Kind == yaml.ScalarNode && root.Tag == "!!null" {
		return // a document holding only comments, or nothing after "---"
	}
	v.docLine = root.Line
	v.lines = map[string]int{}
	indexLines(root, "", v.lines)
	if root.Kind != yaml.MappingNode {
		v.errorf("", "a policy document must be a mapping with apiVersion, kind, metadata and spec")
		return
	}
	nErrs := len(v.errs)
	v.checkKnown(root, reflect.TypeFor[envelope](), "")
	var env envelope
	if len(v.errs) > nErrs || !v.decode(root, &env, "") {
		return
	}
	switch {
	case env.APIVersion == "":
		v.errorf("apiVersion", "required (want %q)", APIVersion)
	case env.APIVersion != APIVersion:
		v.errorf("apiVersion", "unsupported apiVersion %q (want %q)", env.APIVersion, APIVersion)
	}
	if env.Metadata.Name == "" {
		v.errorf("metadata.name", "required")
	}
	if env.Spec.Kind == 0 {
		v.errorf("spec", "required")
	} else if env.Spec.Kind != yaml.MappingNode {
		v.errorf("spec", "must be a mapping")
	}
	src := Source{File: v.file, Line: root.Line}
	newSpec, ok := kinds[env.Kind]
	switch {
	case env.Kind == "":
		v.errorf("kind", "required (one of %s)", strings.Join(kindNames(), ", "))
		return
	case !ok:
		v.errorf("kind", "unknown kind %q (want one of %s)", env.Kind, strings.Join(kindNames(), ", "))
		return
	}
	sp := newSpec(env.Metadata.Name, src)
	if len(v.errs) > nErrs {
		return
	}
	v.checkKnown(&env.Spec, reflect.TypeOf(sp).Elem(), "spec")
	if len(v.errs) > nErrs {
		// Unknown fields and shape errors are reported; decode quietly to
		// report the remaining problems too.
		if err := env.Spec.Decode(sp); err != nil && !errors.As(err, new(*yaml.TypeError)) {
			return
		}
	} else if !v.decode(&env.Spec, sp, "spec") {
		return
	}
	sp.validate(v)
	if len(v.errs) > nErrs {
		return
	}
	key := env.Kind + "/" + env.Metadata.Name
	if prev, ok := names[key]; ok {
		v.errorf("metadata.name", "%s %q is already defined at %s", env.Kind, env.Metadata.Name, prev)
		return
	}
	names[key] = src
	sp.add(set, v)
}

// indexLines records the line of every mapping key and sequence item under
// node, keyed by dotted path ("spec.protocol", "spec.routes[0].match").
func indexLines(node *yaml.Node, path string, out map[string]int) {
	switch node.Kind {
	case yaml.MappingNode:
		for i := 0; i+1 < len(node.Content); i += 2 {
			k, val := node.Content[i], node.Content[i+1]
			p := k.Value
			if path != "" {
				p = path + "." + k.Value
			}
			out[p] = k.Line
			indexLines(val, p, out)
		}
	case yaml.SequenceNode:
		for i, item := range node.Content {
			p := fmt.Sprintf("%s[%d]", path, i)
			out[p] = item.Line
			indexLines(item, p, out)
		}
	case yaml.AliasNode:
		indexLines(node.Alias, path, out)
	}
}

// checkKnown reports mapping keys under node that have no matching yaml
// field in t, and values whose YAML kind cannot fit their field (a mapping
// where a string belongs), recursing into nested structs, maps and slices.
// Errors are placed on the line of the field's key.
func (v *validator) checkKnown(node *yaml.Node, t reflect.Type, path string) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if node.Kind == yaml.AliasNode {
		node = node.Alias
	}
	if t == reflect.TypeFor[yaml.Node]() {
		return // raw node, checked later
	}
	if t == reflect.TypeFor[Duration]() {
		var d Duration
		var te *yaml.TypeError
		if err := d.UnmarshalYAML(node); errors.As(err, &te) {
			v.errorf(path, "%s", strings.Join(te.Errors, "; "))
		}
		return
	}
	want := ""
	switch t.Kind() {
	case reflect.Struct, reflect.Map:
		want = "mapping"
	case reflect.Slice:
		want = "list"
	default:
		want = "scalar"
	}
	got := map[yaml.Kind]string{yaml.MappingNode: "mapping", yaml.SequenceNode: "list", yaml.ScalarNode: "scalar"}[node.Kind]
	if got != want && !(node.Kind == yaml.ScalarNode && node.Tag == "!!null") {
		article := map[string]string{"mapping": "a mapping", "list": "a list", "scalar": "a single value"}
		v.errorf(path, "must be %s, not %s", article[want], article[got])
		return
	}
	switch t.Kind() {
	case reflect.Struct:
		fields := map[string]reflect.Type{}
		var known []string
		for i := range t.NumField() {
			f := t.Field(i)
			name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
			if name == "-" || !f.IsExported() {
				continue
			}
			if name == "" {
				name = strings.ToLower(f.Name)
			}
			fields[name] = f.Type
			known = append(known, name)
		}
		for i := 0; i+1 < len(node.Content); i += 2 {
			k := node.Content[i]
			p := k.Value
			if path != "" {
				p = path + "." + k.Value
			}
			ft, ok := fields[k.Value]
			if !ok {
				v.errs = append(v.errs, &Error{File: v.file, Line: k.Line, Field: p,
					Msg: fmt.Sprintf("unknown field (known fields: %s)", strings.Join(known, ", "))})
				continue
			}
			v.checkKnown(node.Content[i+1], ft, p)
		}
	case reflect.Map:
		for i := 0; i+1 < len(node.Content); i += 2 {
			v.checkKnown(node.Content[i+1], t.Elem(), path+"."+node.Content[i].Value)
		}
	case reflect.Slice:
		for i, item := range node.Content {
			v.checkKnown(item, t.Elem(), fmt.Sprintf("%s[%d]", path, i))
		}
	}
}

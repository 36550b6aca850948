package xds

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
)

// contractTypes are the xds types whose constants are the contract words:
// no package but xds may spell one of their values as a string literal.
var contractTypes = []string{"RetryOn", "FailureReason", "ResourceKind"}

// TestContractWordsOnlyInXDS parses every non-test .go file of the module
// and fails, naming file:line, where a string literal equals a retry
// condition (RetryOn), a failure reason (FailureReason) or a NACK kind word
// (ResourceKind) outside package xds: the other packages name the typed
// constants (DESIGN.md, style 12). The words are read from the constants
// declared in this package, so a new one is guarded at once.
//
// Allowed, because there the word is not the contract's:
//   - struct tags (`json:"secret"` is a JSON key);
//   - the words "listener", "cluster", "secret" (kinds) as keys of log
//     attributes (slog calls Debug, Info, Warn, Error, With, Log) and as
//     Prometheus label names ([]string arguments of prometheus.*): they
//     name the attribute, not a NACKed resource;
//   - the kind words as map keys (`labels["cluster"]`, a label name) and
//     in []any literals (slog attribute lists);
//   - the arguments of sidecar/config's unsupportedField, which are Envoy
//     proto field names ("cluster", "idle_timeout");
//   - the literals of exceptions, each with its reason.
func TestContractWordsOnlyInXDS(t *testing.T) {
	words := contractWords(t)
	if len(words) < 20 {
		t.Fatalf("found only %d contract words in package xds: %v", len(words), words)
	}
	root := moduleRoot(t)
	here, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	var problems []string
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path != root && (strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") || name == "testdata" || name == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		// Package xds itself is skipped, not its subpackages (xdstest).
		if !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") || filepath.Dir(path) == here {
			return nil
		}
		problems = append(problems, checkFile(t, root, path, words)...)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(problems) > 0 {
		t.Errorf("contract words spelled outside package xds (use the xds constants):\n%s", strings.Join(problems, "\n"))
	}
}

// exceptions are literals allowed in one file ("path:literal"), with why.
var exceptions = map[string]string{
	// OpenTelemetry semconv error.type of a request the downstream left
	// before an answer: not the gRPC retry condition of the same spelling.
	`sidecar/tracing/http.go:"cancelled"`: "OTel error.type",
}

// contractWords returns the values of the constants of contractTypes
// declared in this package's non-test files, mapped to "Type Name".
func contractWords(t *testing.T) map[string]string {
	t.Helper()
	fset := token.NewFileSet()
	files, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	words := map[string]string{}
	for _, path := range files {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			gd, ok := decl.(*ast.GenDecl)
			if !ok || gd.Tok != token.CONST {
				continue
			}
			for _, spec := range gd.Specs {
				vs := spec.(*ast.ValueSpec)
				typ, ok := vs.Type.(*ast.Ident)
				if !ok || !slices.Contains(contractTypes, typ.Name) {
					continue
				}
				for i, v := range vs.Values {
					lit, ok := v.(*ast.BasicLit)
					if !ok || lit.Kind != token.STRING {
						continue
					}
					s, err := strconv.Unquote(lit.Value)
					if err != nil {
						t.Fatal(err)
					}
					words[s] = typ.Name + " " + vs.Names[i].Name
				}
			}
		}
	}
	return words
}

// moduleRoot walks up from the working directory to the directory of
// go.mod.
func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the working directory")
		}
		dir = parent
	}
}

// logMethods are the slog methods whose arguments after the message are
// attribute keys and values.
var logMethods = []string{"Debug", "Info", "Warn", "Error", "DebugContext", "InfoContext", "WarnContext", "ErrorContext", "With", "Log"}

// checkFile returns "file:line: literal (Type Name)" for each contract word
// spelled in path outside the allowed places (see
// TestContractWordsOnlyInXDS).
func checkFile(t *testing.T, root, path string, words map[string]string) []string {
	t.Helper()
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
	if err != nil {
		t.Fatal(err)
	}
	rel, _ := filepath.Rel(root, path)
	allowed := map[*ast.BasicLit]bool{}
	allowKinds := func(e ast.Expr) {
		if lit, ok := e.(*ast.BasicLit); ok && strings.HasPrefix(words[unquote(lit)], "ResourceKind ") {
			allowed[lit] = true
		}
	}
	ast.Inspect(f, func(n ast.Node) bool {
		switch n := n.(type) {
		case *ast.Field:
			if n.Tag != nil {
				allowed[n.Tag] = true
			}
		case *ast.IndexExpr:
			allowKinds(n.Index)
		case *ast.CompositeLit:
			if at, ok := n.Type.(*ast.ArrayType); ok {
				if id, ok := at.Elt.(*ast.Ident); ok && id.Name == "any" {
					for _, e := range n.Elts {
						allowKinds(e)
					}
				}
			}
		case *ast.CallExpr:
			var fun string
			var recv string
			switch fn := n.Fun.(type) {
			case *ast.Ident:
				fun = fn.Name
			case *ast.SelectorExpr:
				fun = fn.Sel.Name
				if id, ok := fn.X.(*ast.Ident); ok {
					recv = id.Name
				}
			}
			switch {
			case fun == "unsupportedField":
				for _, a := range n.Args {
					if lit, ok := a.(*ast.BasicLit); ok {
						allowed[lit] = true
					}
				}
			case slices.Contains(logMethods, fun) && recv != "t" && recv != "fmt":
				for _, a := range n.Args {
					allowKinds(a)
				}
			case recv == "prometheus":
				for _, a := range n.Args {
					if cl, ok := a.(*ast.CompositeLit); ok {
						for _, e := range cl.Elts {
							allowKinds(e)
						}
					}
				}
			}
		}
		return true
	})
	var out []string
	ast.Inspect(f, func(n ast.Node) bool {
		lit, ok := n.(*ast.BasicLit)
		if !ok || lit.Kind != token.STRING || allowed[lit] || exceptions[filepath.ToSlash(rel)+":"+lit.Value] != "" {
			return true
		}
		if w, ok := words[unquote(lit)]; ok {
			out = append(out, fmt.Sprintf("%s:%d: %s (xds.%s)", rel, fset.Position(lit.Pos()).Line, lit.Value, strings.Fields(w)[1]))
		}
		return true
	})
	return out
}

func unquote(lit *ast.BasicLit) string {
	s, err := strconv.Unquote(lit.Value)
	if err != nil {
		return ""
	}
	return s
}

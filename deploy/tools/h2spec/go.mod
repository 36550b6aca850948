// Tool module that builds h2spec, the HTTP/2 conformance test suite (RFC
// 7540/9113, RFC 7541 HPACK) run against the sidecar's HTTP/2 listeners by
// internal/e2e's TestH2Spec. h2spec v2.2.1 has no go.mod of its own
// (+incompatible): this module pins its dependencies. Kept apart from the
// project's go.mod so its dependency graph does not leak into meshlet's own
// build.
module github.com/meshlet/meshlet/deploy/tools/h2spec

go 1.26.0

require github.com/summerwind/h2spec v2.2.1+incompatible

require (
	github.com/fatih/color v1.19.0 // indirect
	github.com/inconshreveable/mousetrap v1.1.0 // indirect
	github.com/mattn/go-colorable v0.1.14 // indirect
	github.com/mattn/go-isatty v0.0.20 // indirect
	github.com/spf13/cobra v1.10.2 // indirect
	github.com/spf13/pflag v1.0.9 // indirect
	golang.org/x/net v0.63.0 // indirect
	golang.org/x/sys v0.50.0 // indirect
	golang.org/x/text v0.44.0 // indirect
)

# meshlet — `make demo` runs the example application through the mesh;
# `make test` runs every test (real Consul agent included).
SHELL := /bin/bash
GO    ?= go
BIN   := bin
CONSUL_VERSION := 1.19.2
JAEGER_VERSION := 1.76.0
KUBE_VERSION   := 1.36.3
COREDNS_VERSION := 1.15.0

BINARIES := $(BIN)/controlplane $(BIN)/sidecar
EXAMPLES := $(BIN)/web $(BIN)/api $(BIN)/store $(BIN)/meshlet-demo
GO_SOURCES := $(shell find . -name '*.go' -not -path './deploy/tools/*' -not -path './.work/*') go.mod go.sum

.PHONY: all build examples consul jaeger kube coredns image images test-kube kube-up kube-down demo demo-k8s demo-k8s-stop demo-stop test test-short lint vet fmt docker clean help bench bench-cp deps fuzz test-faults soak

all: build

help:
	@echo "make demo        build everything, run the example app through the mesh, print PASS/FAIL (KEEP=1 leaves it up)"
	@echo "make demo-stop   stop a mesh left up by KEEP=1"
	@echo "make demo-k8s    the example app on a real one-node Kubernetes cluster with meshlet injected (root; KEEP=1 leaves it up, demo-k8s-stop ends it)"
	@echo "make test        run all tests (installs the test peers, builds Consul $(CONSUL_VERSION) and Jaeger $(JAEGER_VERSION) into bin/ first)"
	@echo "make lint        gofmt check, go vet and staticcheck (installs staticcheck v0.8.2 first)"
	@echo "make test-faults the fault suite: SIGKILLs, restarts and freezes under load, zero lost requests (README Reliability; ~2 min)"
	@echo "make soak        SOAK=10m of steady load through two sidecars, memory/goroutines/fds/p99 each minute; fails on growth or loss"
	@echo "make test-short  go test -short: every test that starts no real Consul, Jaeger, cluster, sidecar process or peer (~2 min)"
	@echo "make deps        install what make demo, make test and make lint run (Debian packages, Go tools); silent when all is there"
	@echo "make build       build bin/controlplane and bin/sidecar"
	@echo "make consul      build bin/consul from deploy/tools/consul"
	@echo "make jaeger      build bin/jaeger (Jaeger $(JAEGER_VERSION), query API without web UI) from deploy/tools/jaeger"
	@echo "make kube        build Kubernetes v$(KUBE_VERSION) (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl) and CoreDNS v$(COREDNS_VERSION) into bin/"
	@echo "make images      write the OCI image tarballs the dev cluster imports (meshlet, pause, coredns, jaeger, examples, redis, test app) into bin/images/"
	@echo "make test-kube   run internal/devkube's tests against a real one-node cluster (root; Debian packages: see internal/devkube)"
	@echo "make kube-up     start a one-node cluster in its own network namespace and leave it running (kube-down stops it)"
	@echo "make docker      build the container image (needs a Docker engine)"
	@echo "make bench       data-path benchmark: direct, one sidecar, two sidecars with mTLS, HAProxy, nginx side by side (BENCHFLAGS adds flags, e.g. -quick)"
	@echo "make bench-cp    control-plane scale benchmark: 1,000 services / 10,000 instances in Consul, 1,000 simulated sidecars (BENCHCPFLAGS adds flags)"

build: $(BINARIES)

$(BIN)/controlplane: $(GO_SOURCES)
	$(GO) build -o $@ ./controlplane/cmd/controlplane

$(BIN)/sidecar: $(GO_SOURCES)
	$(GO) build -o $@ ./sidecar/cmd/sidecar

examples: $(EXAMPLES)

$(BIN)/web $(BIN)/api $(BIN)/store: $(GO_SOURCES)
	$(GO) build -o $@ ./examples/$(notdir $@)

$(BIN)/meshlet-demo: $(GO_SOURCES)
	$(GO) build -o $@ ./examples/demo

# Consul is built once from its own tool module (see ../shared/PEERS.md):
# the first build takes several minutes and prints progress. Consul and
# Jaeger are stripped (-s -w) like CoreDNS and Kubernetes: Consul links in
# half the time (9 s against 19 s here) and is 30 % smaller.
consul: $(BIN)/consul

$(BIN)/consul: deploy/tools/consul/go.mod deploy/tools/consul/go.sum
	@mkdir -p $(BIN)
	@LDFLAGS="-s -w" deploy/tools/build-tool.sh deploy/tools/consul github.com/hashicorp/consul $@ "Consul v$(CONSUL_VERSION)"
	@touch $@

# Jaeger (v2, cmd/jaeger) likewise, from deploy/tools/jaeger: about 5 minutes
# the first time. Module builds have no web UI; see README "Tracing with Jaeger".
# Static (CGO_ENABLED=0, Go's own resolver), so the one build runs on this
# host (demo, tests) and in the dev cluster's image alike.
jaeger: $(BIN)/jaeger

$(BIN)/jaeger: deploy/tools/jaeger/go.mod deploy/tools/jaeger/go.sum
	@mkdir -p $(BIN)
	@CGO_ENABLED=0 LDFLAGS="-s -w" deploy/tools/build-tool.sh deploy/tools/jaeger github.com/jaegertracing/jaeger/cmd/jaeger $@ "Jaeger v$(JAEGER_VERSION)"
	@touch $@

# deploy/tools/deps.sh installs what a target runs (Debian packages, Go
# tools) and prints nothing when all of it is there.
deps:
	@deploy/tools/deps.sh demo test kube lint

# Kubernetes from one tool module (deploy/tools/kubernetes; ../shared/PEERS.md):
# ~15 minutes and ~2.5 GB the first time on 2 cores, seconds once Go's build
# cache holds it. The version stamps let kubectl parse the server version.
KUBE_CMDS := kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl
KUBE_BINS := $(addprefix $(BIN)/,$(KUBE_CMDS))
KUBE_LDFLAGS := -s -w $(foreach p,k8s.io/component-base/version k8s.io/client-go/pkg/version,\
	-X $(p).gitVersion=v$(KUBE_VERSION) -X $(p).gitMajor=$(word 1,$(subst ., ,$(KUBE_VERSION))) \
	-X $(p).gitMinor=$(word 2,$(subst ., ,$(KUBE_VERSION))) -X $(p).gitTreeState=clean)

kube: $(KUBE_BINS) $(BIN)/coredns

$(KUBE_BINS) &: deploy/tools/kubernetes/go.mod deploy/tools/kubernetes/go.sum
	@mkdir -p $(BIN)
	@LDFLAGS="$(KUBE_LDFLAGS)" deploy/tools/build-tool.sh deploy/tools/kubernetes \
		"$(addprefix k8s.io/kubernetes/cmd/,$(KUBE_CMDS))" $(BIN)/ "Kubernetes v$(KUBE_VERSION)"
	@touch $(KUBE_BINS)

# CoreDNS (cluster DNS of internal/devkube) from deploy/tools/coredns.
coredns: $(BIN)/coredns

$(BIN)/coredns: deploy/tools/coredns/go.mod deploy/tools/coredns/go.sum
	@mkdir -p $(BIN)
	@CGO_ENABLED=0 LDFLAGS="-s -w" deploy/tools/build-tool.sh deploy/tools/coredns github.com/coredns/coredns $@ "CoreDNS v$(COREDNS_VERSION)"
	@touch $@

# Image tarballs for the dev cluster (internal/devkube), written without a
# Docker daemon by internal/ociimage from static binaries (CGO_ENABLED=0):
# meshlet (both binaries, like the Dockerfile's image), the pause (sandbox)
# image, CoreDNS and the devkube tests' app. `make image` is the meshlet one.
STATIC := $(BIN)/static
IMAGES := $(BIN)/images
MESHLET_IMAGE := meshlet.local/meshlet:dev
POLICY_FILES := $(wildcard policies/*.yaml)

$(STATIC)/controlplane: PKG := ./controlplane/cmd/controlplane
$(STATIC)/sidecar: PKG := ./sidecar/cmd/sidecar
$(STATIC)/pause: PKG := ./internal/devkube/pause
$(STATIC)/devkube-testapp: PKG := ./internal/devkube/testapp
$(STATIC)/web: PKG := ./examples/web
$(STATIC)/api: PKG := ./examples/api
$(STATIC)/store: PKG := ./examples/store
$(STATIC)/controlplane $(STATIC)/sidecar $(STATIC)/pause $(STATIC)/devkube-testapp $(STATIC)/web $(STATIC)/api $(STATIC)/store: $(GO_SOURCES)
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags="-s -w" -o $@ $(PKG)

$(BIN)/ociimage: $(GO_SOURCES)
	$(GO) build -o $@ ./internal/ociimage/cmd/ociimage

image: $(IMAGES)/meshlet.tar
images: $(IMAGES)/meshlet.tar $(IMAGES)/pause.tar $(IMAGES)/coredns.tar $(IMAGES)/devkube-testapp.tar $(IMAGES)/examples.tar $(IMAGES)/redis.tar $(IMAGES)/jaeger.tar

# The example application (examples/kubernetes): web, api and store.
$(IMAGES)/examples.tar: $(STATIC)/web $(STATIC)/api $(STATIC)/store $(BIN)/ociimage
	@mkdir -p $(IMAGES)
	$(BIN)/ociimage -o $@ -tag meshlet.local/examples:dev \
		-file $(STATIC)/web:/usr/local/bin/web -file $(STATIC)/api:/usr/local/bin/api -file $(STATIC)/store:/usr/local/bin/store

# The meshlet image also carries this host's Debian iptables (nft and
# legacy, with their libraries, loader and plugins), which `sidecar
# intercept` runs in the injected init container: the flags come from
# deploy/tools/xtables-files.sh (needs the iptables package).
$(IMAGES)/meshlet.tar: $(STATIC)/controlplane $(STATIC)/sidecar $(POLICY_FILES) $(BIN)/ociimage deploy/tools/xtables-files.sh deploy/tools/elf-files.sh
	@mkdir -p $(IMAGES)
	@deploy/tools/deps.sh image
	deploy/tools/xtables-files.sh > $(BIN)/xtables.flags
	$(BIN)/ociimage -o $@ -tag $(MESHLET_IMAGE) \
		-file $(STATIC)/controlplane:/usr/local/bin/controlplane -file $(STATIC)/sidecar:/usr/local/bin/sidecar \
		$(foreach f,$(POLICY_FILES),-file $(f):/etc/meshlet/$(f):644) \
		$$(cat $(BIN)/xtables.flags) \
		-dir /tmp:1777 -entrypoint '["/usr/local/bin/sidecar"]'

# Debian's redis-server and redis-cli with their libraries, for the
# Kubernetes tests' Redis Service and client (a real Redis through
# transparent interception).
$(IMAGES)/redis.tar: $(BIN)/ociimage deploy/tools/elf-files.sh
	@mkdir -p $(IMAGES)
	@deploy/tools/deps.sh image
	deploy/tools/elf-files.sh /usr/bin/redis-server /usr/bin/redis-cli > $(BIN)/redis.flags
	$(BIN)/ociimage -o $@ -tag meshlet.local/redis:dev $$(cat $(BIN)/redis.flags) -dir /tmp:1777 \
		-entrypoint '["/usr/bin/redis-server"]'

$(IMAGES)/pause.tar: $(STATIC)/pause $(BIN)/ociimage
	@mkdir -p $(IMAGES)
	$(BIN)/ociimage -o $@ -tag meshlet.local/pause:dev -file $(STATIC)/pause:/pause -entrypoint /pause

$(IMAGES)/coredns.tar: $(BIN)/coredns $(BIN)/ociimage
	@mkdir -p $(IMAGES)
	$(BIN)/ociimage -o $@ -tag meshlet.local/coredns:$(COREDNS_VERSION) -file $(BIN)/coredns:/coredns -entrypoint /coredns

# Jaeger for deploy/kubernetes/components/jaeger (the dev overlay has it):
# bin/jaeger itself (static). Its entrypoint is the binary, as in Jaeger's
# published image: the manifests give only --config.
$(IMAGES)/jaeger.tar: $(BIN)/jaeger $(BIN)/ociimage
	@mkdir -p $(IMAGES)
	$(BIN)/ociimage -o $@ -tag meshlet.local/jaeger:$(JAEGER_VERSION) -file $(BIN)/jaeger:/jaeger -user 10001:10001 -entrypoint /jaeger

$(IMAGES)/devkube-testapp.tar: $(STATIC)/devkube-testapp $(BIN)/ociimage
	@mkdir -p $(IMAGES)
	$(BIN)/ociimage -o $@ -tag meshlet.local/devkube-testapp:dev -file $(STATIC)/devkube-testapp:/testapp \
		-entrypoint /testapp -cmd '["serve", ":8080"]'

# The one-node cluster's own tests (root; the Debian packages of
# internal/devkube.DebianPackages). `make kube-up` leaves a cluster running
# for humans and the Kubernetes demo; `make kube-down` removes it.
KUBE_ENV = MESHLET_KUBE_BIN_DIR=$(CURDIR)/$(BIN) MESHLET_KUBE_IMAGE_DIR=$(CURDIR)/$(IMAGES)

test-kube: kube images
	$(KUBE_ENV) $(GO) test -count=1 -v -timeout 15m $(TESTFLAGS) ./internal/devkube/

kube-up: kube images
	$(KUBE_ENV) $(GO) run ./internal/devkube/cmd/devkube up -image $(IMAGES)/meshlet.tar

kube-down:
	$(GO) run ./internal/devkube/cmd/devkube down

demo: $(BIN)/consul $(BIN)/jaeger build examples
	@deploy/tools/deps.sh demo
	@$(BIN)/meshlet-demo $(if $(KEEP),-keep)

demo-stop: $(BIN)/meshlet-demo
	@$(BIN)/meshlet-demo -stop

# The example app on a real one-node Kubernetes cluster with meshlet
# installed from deploy/kubernetes (root; builds Kubernetes, CoreDNS and the
# images the first time: about 15 minutes cold, under a minute warm).
demo-k8s: $(BIN)/consul kube images $(BIN)/meshlet-demo-k8s
	@deploy/tools/deps.sh demo kube
	@MESHLET_KUBE_BIN_DIR=$(CURDIR)/$(BIN) MESHLET_KUBE_IMAGE_DIR=$(CURDIR)/$(IMAGES) MESHLET_CONSUL_BIN=$(CURDIR)/$(BIN)/consul \
		$(BIN)/meshlet-demo-k8s $(if $(KEEP),-keep)

demo-k8s-stop: $(BIN)/meshlet-demo-k8s
	@$(BIN)/meshlet-demo-k8s -stop

$(BIN)/meshlet-demo-k8s: $(GO_SOURCES)
	$(GO) build -o $@ ./examples/demok8s

# TESTFLAGS can add e.g. -run or -v.
test: $(BIN)/consul $(BIN)/jaeger $(BIN)/sidecar $(BIN)/vegeta $(BIN)/h2spec kube images
	@deploy/tools/deps.sh test kube
	$(GO) vet ./...
	$(KUBE_ENV) MESHLET_CONSUL_BIN=$(CURDIR)/$(BIN)/consul MESHLET_JAEGER_BIN=$(CURDIR)/$(BIN)/jaeger MESHLET_SIDECAR_BIN=$(CURDIR)/$(BIN)/sidecar MESHLET_VEGETA_BIN=$(CURDIR)/$(BIN)/vegeta MESHLET_H2SPEC_BIN=$(CURDIR)/$(BIN)/h2spec $(GO) test -race -count=1 -timeout 20m $(TESTFLAGS) ./...

# Data-path benchmark (issue 7; internal/bench): installs the reference
# proxies and load generators it needs (deploy/tools/deps.sh bench), then
# runs every workload against direct, one sidecar, two sidecars with mTLS,
# HAProxy and nginx, alternating systems over rounds; prints tables and
# writes .work/bench/bench-results.json (+ .md). About 15 minutes;
# BENCHFLAGS adds flags (-quick for a 2-minute smoke run; -h lists them).
bench: $(BIN)/sidecar $(BIN)/meshlet-bench
	@deploy/tools/deps.sh bench
	$(BIN)/meshlet-bench -sidecar $(BIN)/sidecar -out .work/bench/bench-results.json $(BENCHFLAGS)

$(BIN)/meshlet-bench: $(GO_SOURCES)
	$(GO) build -o $@ ./internal/bench/cmd/meshlet-bench

# h2spec (HTTP/2 conformance, RFC 9113/7541) from deploy/tools/h2spec, run
# against the sidecar's HTTP/2 listeners by internal/e2e's h2spec test.
$(BIN)/h2spec: deploy/tools/h2spec/go.mod deploy/tools/h2spec/go.sum
	@mkdir -p $(BIN)
	@deploy/tools/build-tool.sh deploy/tools/h2spec github.com/summerwind/h2spec/cmd/h2spec $@ "h2spec v2.2.1"
	@touch $@

$(BIN)/vegeta: deploy/tools/vegeta/go.mod deploy/tools/vegeta/go.sum
	@mkdir -p $(BIN)
	@deploy/tools/build-tool.sh deploy/tools/vegeta github.com/tsenart/vegeta/v12 $@ "vegeta v12.12.0"
	@touch $@

# Control-plane scale benchmark (issue 7; internal/benchcp): prints a table and
# writes .work/bench-cp/result.json. A few minutes; BENCHCPFLAGS adds flags
# (e.g. -changes 600 -rate 20, -profile; go run ./internal/benchcp -h).
bench-cp: $(BIN)/consul $(BIN)/controlplane
	$(GO) run ./internal/benchcp -consul $(BIN)/consul -controlplane $(BIN)/controlplane -out .work/bench-cp $(BENCHCPFLAGS)

# make fuzz: each fuzz target explores for FUZZTIME executions (default
# 100000x; CI runs 20000x, a few seconds each) on top of its seeds and
# testdata/fuzz corpus, which `make test` runs every time. A count, not a
# duration: Go 1.26's coordinator can fail a duration-bounded run with a
# bare "context deadline exceeded" as the time runs out (golang/go#75804,
# fixed in Go 1.27). A failing input is written to the package's
# testdata/fuzz/<target>/: commit it, it becomes a regression test.
FUZZTIME ?= 100000x
FUZZ_TARGETS = ./sidecar/httpproxy:FuzzParseRequest ./sidecar/httpproxy:FuzzParseResponse ./controlplane/policy:FuzzParse \
	./sidecar/config:FuzzDecode ./controlplane/consul:FuzzIntentionsTranslate
fuzz:
	@mkdir -p .work; set -e; for t in $(FUZZ_TARGETS); do \
		pkg=$${t%%:*}; name=$${t##*:}; \
		echo "fuzz: $$name ($$pkg), $(FUZZTIME) executions"; \
		$(GO) test -run '^$$' -fuzz "^$$name\$$" -fuzztime $(FUZZTIME) $$pkg > .work/fuzz-$$name.log 2>&1 || { tail -30 .work/fuzz-$$name.log; exit 1; }; \
	done

# make test-faults: the fault suite (internal/e2e, build tag faults; README
# "Reliability"): each test breaks part of a running mesh (processes, a real
# Consul) under steady vegeta load and fails on any lost request. Prints the
# fault table (FAULT lines); the whole log is .work/test-faults.log.
test-faults: $(BIN)/consul $(BIN)/controlplane $(BIN)/sidecar $(BIN)/vegeta
	@deploy/tools/deps.sh test
	@mkdir -p .work; set -o pipefail; echo "test-faults: about two minutes; log .work/test-faults.log"; \
	MESHLET_CONSUL_BIN=$(CURDIR)/$(BIN)/consul MESHLET_CONTROLPLANE_BIN=$(CURDIR)/$(BIN)/controlplane \
	MESHLET_SIDECAR_BIN=$(CURDIR)/$(BIN)/sidecar MESHLET_VEGETA_BIN=$(CURDIR)/$(BIN)/vegeta \
	$(GO) test -tags faults -run '^TestFault' -count=1 -v -timeout 15m $(TESTFLAGS) ./internal/e2e 2>&1 | tee .work/test-faults.log | \
	grep --line-buffered -E '^(=== RUN|\s*--- |\s*FAULT |ok |FAIL|panic)|_test.go:[0-9]+: '

# make soak: TestSoak (internal/e2e, build tag faults; not in CI): 300 req/s
# and a stream a second through two sidecars with mTLS for SOAK (10m),
# printing each sidecar's memory, goroutines and file descriptors and the
# p99 each minute; fails on any lost request or growth (README Reliability).
SOAK ?= 10m
soak: $(BIN)/consul $(BIN)/controlplane $(BIN)/sidecar $(BIN)/vegeta
	@deploy/tools/deps.sh test
	@mkdir -p .work; set -o pipefail; echo "soak: $(SOAK) under load; log .work/soak.log"; \
	MESHLET_SOAK_DURATION=$(SOAK) MESHLET_CONSUL_BIN=$(CURDIR)/$(BIN)/consul MESHLET_CONTROLPLANE_BIN=$(CURDIR)/$(BIN)/controlplane \
	MESHLET_SIDECAR_BIN=$(CURDIR)/$(BIN)/sidecar MESHLET_VEGETA_BIN=$(CURDIR)/$(BIN)/vegeta \
	$(GO) test -tags faults -run '^TestSoak$$' -count=1 -v -timeout 60m ./internal/e2e 2>&1 | tee .work/soak.log | \
	grep --line-buffered -E '^(=== RUN|\s*--- |\s*SOAK |ok |FAIL|panic)|_test.go:[0-9]+: '

test-short:
	$(GO) test -short -count=1 ./...

# make lint: gofmt (fails listing the files `make fmt` would rewrite), go vet
# and staticcheck, pinned in deploy/tools/deps.sh (lint group; go install from
# the Go module proxy into GOBIN or GOPATH/bin, which is put first on PATH).
# Its defaults apply (no staticcheck.conf). govulncheck is not run: it needs
# the vulnerability database at vuln.go.dev, which CI cannot reach (only the
# Go module proxy and the Debian mirror).
GOBIN_DIR = $(or $(shell $(GO) env GOBIN),$(shell $(GO) env GOPATH)/bin)
LINT_SOURCES = $(shell find . -name '*.go' -not -path './.work/*' -not -path './bin/*' -not -path './.git/*')

lint:
	@deploy/tools/deps.sh lint
	@unformatted=$$(gofmt -l $(LINT_SOURCES)); \
	if [ -n "$$unformatted" ]; then echo "gofmt: not formatted (make fmt rewrites them):"; echo "$$unformatted"; exit 1; fi
	$(GO) vet ./...
	$(GO) vet -tags faults ./internal/e2e
	PATH="$(GOBIN_DIR):$$PATH" staticcheck ./...
	PATH="$(GOBIN_DIR):$$PATH" staticcheck -tags faults ./internal/e2e

vet:
	$(GO) vet ./...

fmt:
	gofmt -l -w $$(git ls-files '*.go')

docker:
	docker build -t meshlet:dev .

clean:
	rm -rf .work $(BINARIES) $(EXAMPLES) $(STATIC) $(IMAGES) $(BIN)/ociimage

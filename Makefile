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

.PHONY: all build examples consul jaeger kube coredns images demo demo-stop test test-short vet fmt docker clean help bench bench-cp

all: build

help:
	@echo "make demo        build everything, run the example app through the mesh, print PASS/FAIL (KEEP=1 leaves it up)"
	@echo "make demo-stop   stop a mesh left up by KEEP=1"
	@echo "make test        run all tests (builds Consul $(CONSUL_VERSION) and Jaeger $(JAEGER_VERSION) into bin/ first)"
	@echo "make build       build bin/controlplane and bin/sidecar"
	@echo "make consul      build bin/consul from deploy/tools/consul"
	@echo "make jaeger      build bin/jaeger (Jaeger $(JAEGER_VERSION), query API without web UI) from deploy/tools/jaeger"
	@echo "make kube        build Kubernetes v$(KUBE_VERSION) (kube-apiserver, kube-controller-manager, kube-scheduler, kubelet, kube-proxy, kubectl) and CoreDNS v$(COREDNS_VERSION) into bin/"
	@echo "make images      write the OCI image tarballs the dev cluster imports (meshlet, pause, coredns, test app) into bin/images/"
	@echo "make test-kube   run internal/devkube's tests against a real one-node cluster (root; Debian packages: see internal/devkube)"
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
# the first build takes several minutes and prints progress.
consul: $(BIN)/consul

$(BIN)/consul: deploy/tools/consul/go.mod deploy/tools/consul/go.sum
	@mkdir -p $(BIN)
	@deploy/tools/build-tool.sh deploy/tools/consul github.com/hashicorp/consul $@ "Consul v$(CONSUL_VERSION)"
	@touch $@

# Jaeger (v2, cmd/jaeger) likewise, from deploy/tools/jaeger: about 5 minutes
# the first time. Module builds have no web UI; see README "Tracing with Jaeger".
jaeger: $(BIN)/jaeger

$(BIN)/jaeger: deploy/tools/jaeger/go.mod deploy/tools/jaeger/go.sum
	@mkdir -p $(BIN)
	@deploy/tools/build-tool.sh deploy/tools/jaeger github.com/jaegertracing/jaeger/cmd/jaeger $@ "Jaeger v$(JAEGER_VERSION)"
	@touch $@

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
	@LDFLAGS="-s -w" deploy/tools/build-tool.sh deploy/tools/coredns github.com/coredns/coredns $@ "CoreDNS v$(COREDNS_VERSION)"
	@touch $@

demo: $(BIN)/consul $(BIN)/jaeger build examples
	@$(BIN)/meshlet-demo $(if $(KEEP),-keep)

demo-stop: $(BIN)/meshlet-demo
	@$(BIN)/meshlet-demo -stop

# TESTFLAGS can add e.g. -run or -v.
test: $(BIN)/consul $(BIN)/jaeger $(BIN)/sidecar
	$(GO) vet ./...
	MESHLET_CONSUL_BIN=$(CURDIR)/$(BIN)/consul MESHLET_JAEGER_BIN=$(CURDIR)/$(BIN)/jaeger MESHLET_SIDECAR_BIN=$(CURDIR)/$(BIN)/sidecar $(GO) test -race -count=1 -timeout 20m $(TESTFLAGS) ./...

# Data-path benchmark (issue 7; internal/bench): installs the reference
# proxies and load generators it needs (deploy/tools/bench-deps.sh), then
# runs every workload against direct, one sidecar, two sidecars with mTLS,
# HAProxy and nginx, alternating systems over rounds; prints tables and
# writes .work/bench/bench-results.json (+ .md). About 15 minutes;
# BENCHFLAGS adds flags (-quick for a 2-minute smoke run; -h lists them).
bench: $(BIN)/sidecar $(BIN)/meshlet-bench
	@deploy/tools/bench-deps.sh
	$(BIN)/meshlet-bench -sidecar $(BIN)/sidecar -out .work/bench/bench-results.json $(BENCHFLAGS)

$(BIN)/meshlet-bench: $(GO_SOURCES)
	$(GO) build -o $@ ./internal/bench/cmd/meshlet-bench

$(BIN)/vegeta: deploy/tools/vegeta/go.mod deploy/tools/vegeta/go.sum
	@mkdir -p $(BIN)
	@deploy/tools/build-tool.sh deploy/tools/vegeta github.com/tsenart/vegeta/v12 $@ "vegeta v12.12.0"
	@touch $@

# Control-plane scale benchmark (issue 7; internal/benchcp): prints a table and
# writes .work/bench-cp/result.json. A few minutes; BENCHCPFLAGS adds flags
# (e.g. -changes 600 -rate 20, -profile; go run ./internal/benchcp -h).
bench-cp: $(BIN)/consul $(BIN)/controlplane
	$(GO) run ./internal/benchcp -consul $(BIN)/consul -controlplane $(BIN)/controlplane -out .work/bench-cp $(BENCHCPFLAGS)

test-short:
	$(GO) test -short -count=1 ./...

vet:
	$(GO) vet ./...

fmt:
	gofmt -l -w $$(git ls-files '*.go')

docker:
	docker build -t meshlet:dev .

clean:
	rm -rf .work $(BINARIES) $(EXAMPLES)

# syntax=docker/dockerfile:1
# One small image holding both binaries (and iptables for the init
# container's `sidecar intercept`), running as non-root:
#   docker build -t meshlet .
#   docker run meshlet sidecar -h          (the default entrypoint is the sidecar)
#   docker run --entrypoint controlplane meshlet -h
# Without a Docker engine, `make image` writes the same image (same paths,
# user and entrypoint, on an empty base instead of distroless) as a tarball
# with internal/ociimage: bin/images/meshlet.tar, tag meshlet.local/meshlet:dev.
FROM golang:1.26-bookworm AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/controlplane ./controlplane/cmd/controlplane \
 && CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/sidecar ./sidecar/cmd/sidecar

# Debian's iptables (nft and legacy, libraries, loader, plugins,
# /etc/protocols) for `sidecar intercept` in the injected init container:
# the files deploy/tools/xtables-files.sh lists, as `make image` adds them.
FROM debian:bookworm-slim AS xtables
RUN apt-get update && apt-get install -y --no-install-recommends iptables && rm -rf /var/lib/apt/lists/*
COPY deploy/tools/xtables-files.sh deploy/tools/elf-files.sh /
RUN /xtables-files.sh --rootfs /rootfs

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=xtables /rootfs/ /
COPY --from=build /out/controlplane /out/sidecar /usr/local/bin/
COPY policies /etc/meshlet/policies
USER 65532:65532
EXPOSE 18000 19000
ENTRYPOINT ["/usr/local/bin/sidecar"]

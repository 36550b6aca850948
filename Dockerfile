# syntax=docker/dockerfile:1
# One small image holding both binaries, running as non-root:
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

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/controlplane /out/sidecar /usr/local/bin/
COPY policies /etc/meshlet/policies
USER 65532:65532
EXPOSE 18000 19000
ENTRYPOINT ["/usr/local/bin/sidecar"]

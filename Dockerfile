# Images of Sluice's two binaries, from one build:
#
#   docker build --target sluice-operator -t sluice-operator:0.1.0 .
#   docker build --target sluice-ingest   -t sluice-ingest:0.1.0 .
#
# The builder links statically against musl (Alpine's Rust image targets musl and links
# statically by default; SQLite and ring compile their C with Alpine's gcc), so the runtime is
# distroless/static: no shell, no libc, CA certificates and a non-root user (65532) only.
#
# Where no image registry can be reached (tests/kind/e2e.sh on such a machine), the same targets
# take binaries built on the host instead, and a base image made locally:
#
#   cp target/release/sluice-ingest target/release/sluice-operator target/image/
#   docker build --target sluice-ingest --build-arg BINARIES=prebuilt \
#     --build-arg RUNTIME_IMAGE=<a local image with the C library the binaries link> .
#
# (No `# syntax=` line: BuildKit would fetch that frontend image from a registry. The built-in
# frontend has everything this file uses.)

ARG RUST_VERSION=1.95
ARG RUST_IMAGE=docker.io/library/rust:${RUST_VERSION}-alpine
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot
# `build` compiles in RUST_IMAGE; `prebuilt` takes target/image/ from the build context.
ARG BINARIES=build

FROM ${RUST_IMAGE} AS build
# musl-dev follows the Alpine release of the pinned Rust image; pinning its version too would
# break on every Alpine point release.
# hadolint ignore=DL3018
RUN apk add --no-cache musl-dev
WORKDIR /src
# The whole workspace (.dockerignore leaves out target/, tools/, .git): cargo reads every member's
# manifest even when building two of them.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p sluice-ingest -p sluice-operator --bins \
 && mkdir -p /out \
 && cp target/release/sluice-ingest target/release/sluice-operator /out/

FROM scratch AS prebuilt
COPY target/image/sluice-ingest target/image/sluice-operator /out/

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_IMAGE} AS runtime
USER 65532:65532

# The operator: `sluice-operator run` (the chart passes `run`), /healthz and /metrics on 8080.
FROM runtime AS sluice-operator
COPY --from=binaries /out/sluice-operator /usr/local/bin/sluice-operator
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sluice-operator"]
CMD ["run"]

# The ingest service. The operator starts it as `sluice-ingest` (found on PATH) configured by
# environment; standalone, give it --database-url (the default SQLite file would need a volume).
FROM runtime AS sluice-ingest
COPY --from=binaries /out/sluice-ingest /usr/local/bin/sluice-ingest
ENV SLUICE_LISTEN=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/sluice-ingest"]

# attnd in a container: a build image builds it, a runtime image runs it as a non-root user
# (uid 10001). By default both are nvidia/cuda images: the build has nvcc, so the CUDA backend is
# built; run it with the NVIDIA container runtime (`docker run --gpus all`) to serve on the GPU
# (without a GPU the server falls back to the CPU backend). Any Debian/Ubuntu image whose apt has
# the packages of scripts/install-deps --build-only works as a base: without nvcc the build leaves
# the CUDA backend out (ATTN_WITH_CUDA=AUTO), e.g. the plain Debian 12 image that
# scripts/container-base-image makes:
#   podman build --format docker --build-arg BUILD_IMAGE=localhost/attnd-base:bookworm \
#     --build-arg RUNTIME_IMAGE=localhost/attnd-base:bookworm -t attnd:cpu .
# (--format docker: podman keeps HEALTHCHECK only in Docker-format images.)
ARG BUILD_IMAGE=nvidia/cuda:13.0.0-devel-ubuntu24.04
ARG RUNTIME_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

FROM ${BUILD_IMAGE} AS build
WORKDIR /src
COPY scripts/install-deps scripts/install-deps
RUN scripts/install-deps --build-only
# Only what the build reads, so that edits to tests, docs or deploy files keep the layer cache.
COPY CMakeLists.txt CMakePresets.json ./
COPY proto proto
COPY kernels kernels
COPY server server
COPY client client
COPY bench bench
# ccache (installed by install-deps, used by CMakeLists) keeps its cache in a build cache mount
# (BuildKit and podman/buildah), so a rebuild after a source change recompiles only what changed.
ENV CCACHE_DIR=/ccache
RUN --mount=type=cache,target=/ccache,id=attnd-ccache \
    cmake --preset release -DATTN_BUILD_TESTS=OFF \
 && cmake --build --preset release -j "$(nproc)" --target attnd attn \
 && mkdir -p /out/bin /out/lib \
 && cp build/release/attnd build/release/attn /out/bin/ \
 # the shared libraries the runtime image lacks (gRPC, protobuf, spdlog, ...); the C library and
 # the CUDA driver come from the runtime image and the NVIDIA runtime.
 && ldd /out/bin/attnd /out/bin/attn | awk '/=> \// {print $3}' | sort -u \
    | grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libcuda)\.so' \
    | xargs -r cp -L -t /out/lib

FROM ${RUNTIME_IMAGE}
RUN useradd --system --uid 10001 --no-create-home attnd
COPY --from=build /out/bin/ /usr/local/bin/
COPY --from=build /out/lib/ /usr/local/lib/attnd/
ENV LD_LIBRARY_PATH=/usr/local/lib/attnd
USER attnd
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
  CMD ["attn", "--server", "127.0.0.1:50051", "--timeout-ms", "2000", "health"]
ENTRYPOINT ["attnd"]
# Beyond loopback: set ATTND_TOKEN (or mount a --token-file) and/or TLS flags in production.
CMD ["--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9464"]

# attnd in a container: an nvidia/cuda devel image builds it, a runtime image runs it as a
# non-root user. Run with the NVIDIA container runtime (`docker run --gpus all`) to serve on the
# GPU; without a GPU the server falls back to the CPU backend.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04 AS build
WORKDIR /src
COPY scripts/install-deps scripts/install-deps
RUN scripts/install-deps --build-only
COPY . .
RUN cmake --preset release -DATTN_BUILD_TESTS=OFF && cmake --build --preset release -j "$(nproc)" \
 && mkdir -p /out/bin /out/lib \
 && cp build/release/attnd build/release/attn /out/bin/ \
 # the shared libraries the runtime image lacks (gRPC, protobuf, spdlog, ...); the C library and
 # the CUDA driver come from the runtime image and the NVIDIA runtime.
 && ldd /out/bin/attnd /out/bin/attn | awk '/=> \// {print $3}' | sort -u \
    | grep -vE '/(libc|libm|libpthread|libdl|librt|ld-linux[^/]*|libcuda)\.so' \
    | xargs -r cp -L -t /out/lib

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04
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

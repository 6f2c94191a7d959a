# The two commands of the README: `make serve` and `make test`. Both install what is missing,
# configure with a CMake preset and build first. `make test` is what CI runs: the release build's
# tests, then the ASan/UBSan build's tests and a bounded fuzzing run. `make test-fast` runs only
# the first.
PRESET ?= release
LISTEN ?= 127.0.0.1:50051
JOBS ?= $(shell nproc)

.PHONY: all deps build build-sanitize serve test test-fast test-sanitize format clean

all: build

deps:
	@scripts/install-deps

build: deps
	cmake --preset $(PRESET)
	cmake --build --preset $(PRESET) -j $(JOBS)

serve: build
	./build/$(PRESET)/attnd --listen $(LISTEN) $(ARGS)

build-sanitize: deps
	cmake --preset sanitize
	cmake --build --preset sanitize -j $(JOBS)

test-fast: build
	ctest --preset $(PRESET) -j $(JOBS)

test-sanitize: build-sanitize
	ctest --preset sanitize -j $(JOBS)

test: test-fast test-sanitize

format:
	find kernels server client tests bench proto -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' | xargs clang-format -i

clean:
	rm -rf build

# The two commands of the README: `make serve` and `make test`. Both install what is missing,
# configure with a CMake preset and build first.
PRESET ?= release
LISTEN ?= 127.0.0.1:50051
JOBS ?= $(shell nproc)

.PHONY: all deps build serve test format clean

all: build

deps:
	@scripts/install-deps

build: deps
	cmake --preset $(PRESET)
	cmake --build --preset $(PRESET) -j $(JOBS)

serve: build
	./build/$(PRESET)/attnd --listen $(LISTEN) $(ARGS)

test: build
	ctest --preset $(PRESET) -j $(JOBS)

format:
	find kernels server client tests bench proto -name '*.cc' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' | xargs clang-format -i

clean:
	rm -rf build

// The flags and inputs every op subcommand (matmul, softmax, attention) shares: input files or
// --random, the dtype, the variant, the output file, --shm.
#pragma once

#include <CLI/CLI.hpp>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "attn/tensor.h"

namespace attn::cli {

struct OpFlags {
  bool shm = false;  // inputs and output through a POSIX shared-memory region
  std::vector<std::string> inputs;
  std::string random;
  std::string dtype = "float32";
  std::string kernel;
  std::string output;
  std::uint64_t seed = 0;
  bool dtype_given = false;
};

void add_op_flags(CLI::App* cmd, OpFlags& f, const char* inputs_help, const char* random_help);

// Either --random or exactly `n` input files (`names` says which).
Status need_inputs(const OpFlags& f, std::size_t n, const char* names);

// "8,1000" as a shape; `what` names the flag in the error.
Result<Shape> parse_shape(const std::string& text, const std::string& what);

// --dtype, parsed.
Result<DType> dtype_of(const OpFlags& f);

// Standard normal values.
Tensor random_tensor(DType dtype, const Shape& shape, std::mt19937_64& rng);

// The input files in order into `outs`, each converted to --dtype when one was given.
Status load_inputs(const OpFlags& f, std::initializer_list<Tensor*> outs);

}  // namespace attn::cli

#include "op_inputs.h"

#include <sstream>
#include <stdexcept>

#include "attn/npy.h"

namespace attn::cli {
namespace {

// Input i from its .npy file, converted to --dtype when one was given.
Result<Tensor> load_input(const OpFlags& f, std::size_t i) {
  ATTN_ASSIGN_OR_RETURN(t, read_npy(f.inputs[i]));
  if (!f.dtype_given) return t;
  ATTN_ASSIGN_OR_RETURN(dtype, dtype_of(f));
  if (dtype == t.dtype()) return t;
  return Tensor::from_floats(dtype, t.shape(), t.to_floats());
}

}  // namespace

void add_op_flags(CLI::App* cmd, OpFlags& f, const char* inputs_help, const char* random_help) {
  cmd->add_option("inputs", f.inputs, inputs_help);
  cmd->add_option("--random", f.random, random_help);
  cmd->add_option("--dtype", f.dtype,
                  "float32, float16 or bfloat16 (random inputs, or to convert .npy inputs)")
      ->each([&f](const std::string&) { f.dtype_given = true; });
  cmd->add_option("--kernel", f.kernel,
                  "variant name from `attn kernels` (default: the server picks)");
  cmd->add_option("-o,--output", f.output, "write the result here (.npy)");
  cmd->add_option("--seed", f.seed, "seed for --random");
  cmd->add_flag(
      "--shm", f.shm,
      "pass the inputs and the output through a POSIX shared-memory region (a server on this host "
      "run with --shared-memory system)");
}

Status need_inputs(const OpFlags& f, std::size_t n, const char* names) {
  if (!f.random.empty() && !f.inputs.empty())
    return invalid_argument("give either --random or input files, not both");
  if (f.random.empty() && f.inputs.size() != n)
    return invalid_argument(std::string("expected ") + std::to_string(n) + " input files (" +
                            names + ") or --random, got " + std::to_string(f.inputs.size()));
  return Status::Ok();
}

Result<Shape> parse_shape(const std::string& text, const std::string& what) {
  Shape shape;
  std::stringstream ss(text);
  for (std::string d; std::getline(ss, d, ',');) {
    try {
      std::size_t used = 0;
      shape.push_back(std::stoll(d, &used));
      if (used != d.size()) throw std::invalid_argument(d);
    } catch (const std::exception&) {
      return invalid_argument(what + ": expected comma-separated integers, got \"" + text + "\"");
    }
  }
  ATTN_RETURN_IF_ERROR(checked_element_count(shape, what).status());
  return shape;
}

Result<DType> dtype_of(const OpFlags& f) {
  auto d = parse_dtype(f.dtype);
  if (!d) return invalid_argument("--dtype: expected float32, float16 or bfloat16, got " + f.dtype);
  return *d;
}

Tensor random_tensor(DType dtype, const Shape& shape, std::mt19937_64& rng) {
  Tensor t(dtype, shape);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  for (std::size_t i = 0; i < static_cast<std::size_t>(t.numel()); ++i) t.set(i, dist(rng));
  return t;
}

Status load_inputs(const OpFlags& f, std::initializer_list<Tensor*> outs) {
  std::size_t i = 0;
  for (Tensor* out : outs) {
    ATTN_ASSIGN_OR_RETURN(t, load_input(f, i++));
    *out = std::move(t);
  }
  return Status::Ok();
}

}  // namespace attn::cli

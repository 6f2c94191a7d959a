#include "op_report.h"

#include <google/protobuf/util/json_util.h>

#include <cstdio>
#include <iostream>

#include "attn/npy.h"
#include "output.h"

namespace attn::cli {
namespace {

// The result files asked for; false (said on stderr) when one cannot be written.
bool write_outputs(const OpResult& r, const OpFlags& f, const char* lse_path) {
  if (!f.output.empty()) {
    Status s = write_npy(f.output, r.output);
    if (!s.ok()) return std::cerr << "attn: " << s.message() << "\n", false;
  }
  if (lse_path && *lse_path) {
    Status s = write_npy(lse_path, r.lse);
    if (!s.ok()) return std::cerr << "attn: " << s.message() << "\n", false;
  }
  return true;
}

void print_op_json(const OpResult& r, const OpFlags& f) {
  const auto& t = r.timings;
  const double secs = t.kernel_ns() / 1e9;
  std::string timings;
  google::protobuf::util::JsonPrintOptions opts;
  opts.always_print_primitive_fields = true;
  opts.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(t, &timings, opts);
  std::cout << "{\"output_shape\": " << shape_to_string(r.output.shape())
            << ", \"output_dtype\": \"" << dtype_name(r.output.dtype()) << "\", \"output\": \""
            << f.output << "\", \"tflops\": " << (secs > 0 ? t.flops() / secs / 1e12 : 0.0)
            << ", \"gbps\": " << (secs > 0 ? t.bytes() / secs / 1e9 : 0.0)
            << ", \"timings\": " << timings << "}\n";
}

void print_op_table(const OpResult& r, const OpFlags& f) {
  const auto& t = r.timings;
  const double secs = t.kernel_ns() / 1e9;
  std::printf("%-8s %s\n%-8s %s\n", "kernel", t.kernel().c_str(), "device", t.device().c_str());
  std::printf("%-8s %s\n%-8s %s\n%-8s %s\n%-8s %s\n%-8s %s\n", "queue",
              format_ns(t.queue_ns()).c_str(), "h2d", format_ns(t.h2d_ns()).c_str(), "compute",
              format_ns(t.kernel_ns()).c_str(), "d2h", format_ns(t.d2h_ns()).c_str(), "total",
              format_ns(t.total_ns()).c_str());
  if (secs > 0)
    std::printf("%-8s %.3f TFLOP/s, %.1f GB/s\n", "rate", t.flops() / secs / 1e12,
                t.bytes() / secs / 1e9);
  std::printf("%-8s %s %s%s%s\n", "output", shape_to_string(r.output.shape()).c_str(),
              std::string(dtype_name(r.output.dtype())).c_str(), f.output.empty() ? "" : " -> ",
              f.output.c_str());
}

}  // namespace

int report_op(const GlobalFlags& g, const Result<OpResult>& r, const OpFlags& f,
              const char* lse_path) {
  if (!r.ok()) return call_failed(r.status());
  if (!write_outputs(*r, f, lse_path)) return 1;
  if (g.json)
    print_op_json(*r, f);
  else
    print_op_table(*r, f);
  return 0;
}

}  // namespace attn::cli

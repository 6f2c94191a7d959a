#include "attn/npy.h"

#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

namespace attn {
namespace {

Status bad(const std::string& path, const std::string& why) {
  return invalid_argument(path + ": not a .npy file attn can read: " + why);
}

}  // namespace

Result<Tensor> read_npy(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return not_found(path + ": cannot open");
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) return bad(path, "no magic");
  const int major = static_cast<unsigned char>(magic[6]);
  std::uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2];
    if (!in.read(reinterpret_cast<char*>(b), 2)) return bad(path, "truncated header");
    header_len = b[0] | (b[1] << 8);
  } else if (major == 2 || major == 3) {
    unsigned char b[4];
    if (!in.read(reinterpret_cast<char*>(b), 4)) return bad(path, "truncated header");
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (std::uint32_t{b[3]} << 24);
  } else {
    return bad(path, "version " + std::to_string(major));
  }
  if (header_len > (1u << 20)) return bad(path, "header too large");
  std::string header(header_len, '\0');
  if (!in.read(header.data(), header_len)) return bad(path, "truncated header");

  std::smatch m;
  if (!std::regex_search(header, m, std::regex(R"('descr'\s*:\s*'([^']*)')")))
    return bad(path, "no descr");
  const std::string descr = m[1];
  if (std::regex_search(header, m, std::regex(R"('fortran_order'\s*:\s*True)")))
    return bad(path, "Fortran order; save with np.ascontiguousarray");
  if (!std::regex_search(header, m, std::regex(R"('shape'\s*:\s*\(([^)]*)\))")))
    return bad(path, "no shape");
  Shape shape;
  std::stringstream dims(m[1].str());
  for (std::string d; std::getline(dims, d, ',');) {
    d = std::regex_replace(d, std::regex(R"(\s|L)"), "");
    if (!d.empty()) shape.push_back(std::stoll(d));
  }
  if (shape.empty()) shape.push_back(1);  // a numpy scalar
  ATTN_ASSIGN_OR_RETURN(count, checked_element_count(shape, path + " shape"));

  if (descr == "<f4" || descr == "<f2") {
    Tensor t(descr == "<f4" ? DType::kFloat32 : DType::kFloat16, shape);
    if (!in.read(static_cast<char*>(t.data()), static_cast<std::streamsize>(t.bytes())))
      return bad(path, "fewer bytes than the shape needs");
    return t;
  }
  if (descr == "<f8") {
    std::vector<double> values(static_cast<std::size_t>(count));
    if (!in.read(reinterpret_cast<char*>(values.data()),
                 static_cast<std::streamsize>(values.size() * sizeof(double))))
      return bad(path, "fewer bytes than the shape needs");
    Tensor t(DType::kFloat32, shape);
    for (std::size_t i = 0; i < values.size(); ++i) t.set(i, static_cast<float>(values[i]));
    return t;
  }
  return bad(path, "dtype '" + descr + "'; expected '<f4', '<f2' or '<f8'");
}

Status write_npy(const std::string& path, const Tensor& tensor) {
  Tensor as_f32;
  const Tensor* t = &tensor;
  if (tensor.dtype() == DType::kBFloat16) {
    as_f32 = Tensor::from_floats(DType::kFloat32, tensor.shape(), tensor.to_floats());
    t = &as_f32;
  }
  std::string shape;
  for (auto d : t->shape()) shape += std::to_string(d) + ",";
  if (t->shape().size() > 1) shape.pop_back();
  std::string header = std::string("{'descr': '") + (t->dtype() == DType::kFloat32 ? "<f4" : "<f2") +
                       "', 'fortran_order': False, 'shape': (" + shape + "), }";
  // Magic (6) + version (2) + length (2) + header + newline, padded to a multiple of 64.
  const std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header += '\n';
  std::ofstream out(path, std::ios::binary);
  if (!out) return unavailable(path + ": cannot create");
  const unsigned char len[2] = {static_cast<unsigned char>(header.size() & 0xff),
                                static_cast<unsigned char>(header.size() >> 8)};
  out.write("\x93NUMPY\x01\x00", 8);
  out.write(reinterpret_cast<const char*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(static_cast<const char*>(t->data()), static_cast<std::streamsize>(t->bytes()));
  if (!out) return unavailable(path + ": write failed");
  return Status::Ok();
}

}  // namespace attn

// .npy files (NumPy's format, version 1.0-3.0) to and from host tensors. Reads little-endian
// float32 ('<f4'), float16 ('<f2') and float64 ('<f8', rounded to float32), C order. numpy has no
// bfloat16, so bfloat16 tensors are written as float32.
#pragma once

#include <string>

#include "attn/status.h"
#include "attn/tensor.h"

namespace attn {

Result<Tensor> read_npy(const std::string& path);
Status write_npy(const std::string& path, const Tensor& tensor);

}  // namespace attn

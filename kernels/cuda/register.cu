// The CUDA backend's variants. Each rung lives in its own numbered file under matmul/, softmax/
// and attention/ and adds itself here.
#include "attn/registry.h"

namespace attn {

void register_cuda_variants(Registry&) {}

}  // namespace attn

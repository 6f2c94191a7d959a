#!/usr/bin/env bash
# Writes the fuzzer's seed corpus: one byte choosing the request type (0 matmul, 1 softmax,
# 2 attention), then a serialized request. Run from this folder: ./make_seeds.sh
set -euo pipefail
proto_root=../../proto
seed() {  # name selector message text
  { printf "\\x$(printf %02x "$2")"; printf '%s' "$4" | protoc -I "$proto_root" --encode="$3" attn/v1/attn.proto; } >"corpus/$1"
}
f32() { python3 -c "import struct,sys; sys.stdout.write(''.join('\\\\%03o' % b for b in struct.pack('<%df' % $1, *[0.5]*$1)))"; }
seed matmul_2x3x2 0 attn.v1.MatmulRequest "a { dtype: D_TYPE_FLOAT32 shape: [2, 3] data: \"$(f32 6)\" } b { dtype: D_TYPE_FLOAT32 shape: [3, 2] data: \"$(f32 6)\" }"
seed matmul_values_t 0 attn.v1.MatmulRequest "a { dtype: D_TYPE_FLOAT16 shape: [3, 2] values: [1, 2, 3, 4, 5, 6] } b { dtype: D_TYPE_BFLOAT16 shape: [2, 3] values: [1, 2, 3, 4, 5, 6] } transpose_a: true transpose_b: true return_values: true"
seed matmul_batched 0 attn.v1.MatmulRequest "a { dtype: D_TYPE_FLOAT32 shape: [2, 1, 2] data: \"$(f32 4)\" } b { dtype: D_TYPE_FLOAT32 shape: [2, 2, 1] data: \"$(f32 4)\" } kernel: \"matmul/cpu_blocked\""
seed softmax_rows 1 attn.v1.SoftmaxRequest "x { dtype: D_TYPE_FLOAT32 shape: [2, 4] data: \"$(f32 8)\" } return_values: true"
seed softmax_values 1 attn.v1.SoftmaxRequest "x { dtype: D_TYPE_FLOAT16 shape: [3] values: [1, -2, 3] } kernel: \"softmax/cpu\""
seed attention_gqa 2 attn.v1.AttentionRequest "q { dtype: D_TYPE_FLOAT32 shape: [1, 2, 2, 2] data: \"$(f32 8)\" } k { dtype: D_TYPE_FLOAT32 shape: [1, 1, 3, 2] data: \"$(f32 6)\" } v { dtype: D_TYPE_FLOAT32 shape: [1, 1, 3, 2] data: \"$(f32 6)\" } causal: true return_lse: true"
seed attention_scale 2 attn.v1.AttentionRequest "q { dtype: D_TYPE_BFLOAT16 shape: [1, 1, 1, 4] values: [1, 2, 3, 4] } k { dtype: D_TYPE_BFLOAT16 shape: [1, 1, 2, 4] values: [1, 2, 3, 4, 5, 6, 7, 8] } v { dtype: D_TYPE_BFLOAT16 shape: [1, 1, 2, 4] values: [1, 2, 3, 4, 5, 6, 7, 8] } scale: 0.5 return_values: true"

// Decoding wire tensors: each malformed tensor is refused with the field, the expectation and
// what came; good ones are viewed in place.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "attn/wire.h"

namespace attn {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

v1::Tensor tensor(v1::DType dtype, Shape shape, std::size_t bytes) {
  v1::Tensor t;
  t.set_dtype(dtype);
  for (auto d : shape) t.add_shape(d);
  t.set_data(std::string(bytes, '\0'));
  return t;
}

Status decode(const v1::Tensor& t, std::int64_t max_elements = 1 << 20) {
  wire::TensorLimits limits;
  limits.max_elements = max_elements;
  return wire::decode_tensor(t, "x", limits).status();
}

TEST(Wire, GoodDataIsViewedInPlace) {
  v1::Tensor t = tensor(v1::D_TYPE_BFLOAT16, {2, 3}, 12);
  auto d = wire::decode_tensor(t, "x", {});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->view.data, t.data().data());
  EXPECT_EQ(d->view.dtype, DType::kBFloat16);
  EXPECT_EQ(d->view.shape, (Shape{2, 3}));
}

TEST(Wire, ValuesAreRoundedToTheDtype) {
  v1::Tensor t;
  t.set_dtype(v1::D_TYPE_FLOAT16);
  t.add_shape(2);
  t.add_values(1.0f);
  t.add_values(1.0f + 1.0f / 4096);  // not a float16: rounds to 1
  auto d = wire::decode_tensor(t, "x", {});
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(load_as_float(d->view.data, DType::kFloat16, 1), 1.0f);
}

TEST(Wire, Refusals) {
  EXPECT_THAT(decode(tensor(v1::D_TYPE_UNSPECIFIED, {2}, 8)).message(),
              AllOf(HasSubstr("x.dtype"), HasSubstr("D_TYPE_UNSPECIFIED")));
  EXPECT_THAT(decode(tensor(v1::D_TYPE_FLOAT32, {2, 3}, 20)).message(),
              AllOf(HasSubstr("x.data"), HasSubstr("expected 24 bytes"), HasSubstr("got 20")));
  EXPECT_THAT(decode(tensor(v1::D_TYPE_FLOAT32, {2, 0}, 0)).message(), HasSubstr("x.shape[1]"));
  EXPECT_THAT(decode(tensor(v1::D_TYPE_FLOAT32, {-1}, 4)).message(), HasSubstr("got -1"));
  EXPECT_THAT(decode(tensor(v1::D_TYPE_FLOAT32, {1LL << 40, 1LL << 40}, 4)).message(),
              HasSubstr("overflows"));
  EXPECT_THAT(decode(tensor(v1::D_TYPE_FLOAT32, {}, 4)).message(), HasSubstr("x.shape"));
  v1::Tensor neither = tensor(v1::D_TYPE_FLOAT32, {1}, 0);
  EXPECT_THAT(decode(neither).message(), HasSubstr("got neither"));
  v1::Tensor both = tensor(v1::D_TYPE_FLOAT32, {1}, 4);
  both.add_values(1.0f);
  EXPECT_THAT(decode(both).message(), HasSubstr("got both"));
  v1::Tensor few;
  few.set_dtype(v1::D_TYPE_FLOAT32);
  few.add_shape(3);
  few.add_values(1.0f);
  EXPECT_THAT(decode(few).message(), AllOf(HasSubstr("x.values"), HasSubstr("expected 3")));
  Status big = decode(tensor(v1::D_TYPE_FLOAT32, {1000, 1000}, 4), 1000);
  EXPECT_EQ(big.code(), StatusCode::kResourceExhausted);
  EXPECT_THAT(big.message(), HasSubstr("limit of 1000"));
}

TEST(Wire, StatusMappingRoundTrips) {
  for (auto code : {StatusCode::kInvalidArgument, StatusCode::kResourceExhausted,
                    StatusCode::kNotFound, StatusCode::kFailedPrecondition,
                    StatusCode::kUnavailable, StatusCode::kInternal, StatusCode::kUnauthenticated,
                    StatusCode::kDeadlineExceeded, StatusCode::kCancelled}) {
    Status s(code, "m");
    EXPECT_EQ(wire::from_grpc(wire::to_grpc(s)).code(), code);
  }
  EXPECT_EQ(wire::to_grpc(invalid_argument("m")).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace attn

// The Prometheus endpoint of the real attnd, scraped over HTTP after some calls.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <regex>

#include "attn/client.h"
#include "support/http_get.h"
#include "support/random.h"
#include "support/server_process.h"

namespace attn {
namespace {

using ::testing::HasSubstr;

// The value of the sample whose name and labels contain all of `parts`, or -1.
double sample(const std::string& text, std::initializer_list<std::string> parts) {
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.empty() || line[0] == '#') continue;
    bool all = true;
    for (const auto& p : parts) all &= line.find(p) != std::string::npos;
    if (all) return std::stod(line.substr(line.rfind(' ') + 1));
  }
  return -1;
}

TEST(Metrics, CountsCallsByOpVariantAndCode) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--metrics-listen", "127.0.0.1:0"});
  ASSERT_GT(server.metrics_port(), 0) << server.log();
  Client client(server.address());
  std::mt19937_64 rng(testing::seed());
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(client.softmax(testing::random_tensor(DType::kFloat32, {4, 33}, rng)).ok());
  Tensor a = testing::random_tensor(DType::kFloat32, {7, 5}, rng), b = testing::random_tensor(DType::kFloat32, {5, 3}, rng);
  ASSERT_TRUE(client.matmul(a, b).ok());
  EXPECT_FALSE(client.matmul(a, a).ok());  // inner dimensions differ
  EXPECT_FALSE(client.softmax(a, "softmax/no_such_kernel").ok());

  const std::string text = testing::http_get(server.metrics_port(), "/metrics");
  ASSERT_THAT(text, HasSubstr("attnd_requests_total")) << text;
  EXPECT_EQ(sample(text, {"attnd_requests_total{", "op=\"softmax\"", "variant=\"softmax/cpu\"", "code=\"OK\""}), 3) << text;
  EXPECT_EQ(sample(text, {"attnd_requests_total{", "op=\"matmul\"", "code=\"OK\""}), 1) << text;
  EXPECT_EQ(sample(text, {"attnd_requests_total{", "op=\"matmul\"", "code=\"INVALID_ARGUMENT\""}), 1) << text;
  // A refused call counts under variant "none": names that clients make up never become labels.
  EXPECT_EQ(sample(text, {"attnd_requests_total{", "op=\"softmax\"", "variant=\"none\"", "code=\"INVALID_ARGUMENT\""}), 1) << text;
  EXPECT_THAT(text, ::testing::Not(HasSubstr("no_such_kernel")));
  // Latency: one observation per successful call and phase.
  EXPECT_EQ(sample(text, {"attnd_latency_seconds_count{", "op=\"softmax\"", "phase=\"total\""}), 3) << text;
  EXPECT_EQ(sample(text, {"attnd_latency_seconds_count{", "op=\"softmax\"", "phase=\"kernel\""}), 3) << text;
  EXPECT_EQ(sample(text, {"attnd_latency_seconds_count{", "op=\"matmul\"", "phase=\"queue\""}), 1) << text;
  // Bytes: three softmax requests of 4x33 floats each carry at least 3 * 528 bytes in and out.
  EXPECT_GE(sample(text, {"attnd_payload_bytes_total{", "op=\"softmax\"", "direction=\"in\""}), 3 * 528) << text;
  EXPECT_GE(sample(text, {"attnd_payload_bytes_total{", "op=\"softmax\"", "direction=\"out\""}), 3 * 528) << text;
  EXPECT_EQ(sample(text, {"attnd_queue_depth{", "device=\"cpu"}), 0) << text;
  // attn::Client declares every request's size, so the memory bound can refuse one unread.
  EXPECT_EQ(sample(text, {"attnd_request_size_declared_total{", "op=\"softmax\"", "declared=\"yes\""}), 4) << text;
  EXPECT_EQ(sample(text, {"attnd_request_size_declared_total{", "op=\"matmul\"", "declared=\"yes\""}), 2) << text;
  EXPECT_EQ(sample(text, {"attnd_request_size_declared_total{", "declared=\"no\""}), -1) << text;
  // A request sent by hand without the declaration counts as undeclared.
  v1::SoftmaxRequest bare;
  v1::SoftmaxResponse resp;
  grpc::ClientContext ctx;
  EXPECT_FALSE(client.stub().Softmax(&ctx, bare, &resp).ok());  // no input: refused, but counted first
  EXPECT_EQ(sample(testing::http_get(server.metrics_port(), "/metrics"),
                   {"attnd_request_size_declared_total{", "op=\"softmax\"", "declared=\"no\""}),
            1);
}

TEST(Metrics, OffByDefault) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"});
  EXPECT_EQ(server.metrics_port(), 0);
  EXPECT_THAT(server.log(), ::testing::Not(HasSubstr("metrics on")));
}

}  // namespace
}  // namespace attn

// Who gets in, against the real attnd: TLS, mutual TLS and the bearer token, with certificates
// this test makes with openssl. Health and reflection stay reachable without a token.
#include <gmock/gmock.h>
#include <grpcpp/create_channel.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <fstream>

#include "attn/client.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "reflection/v1alpha/reflection.grpc.pb.h"
#include "support/server_process.h"

namespace attn {
namespace {

using ::testing::HasSubstr;

class SecurityTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    char dir_template[] = "/tmp/attnd-certs-XXXXXX";
    ASSERT_NE(mkdtemp(dir_template), nullptr);
    dir_ = dir_template;
    // A CA that signs a server certificate (localhost, 127.0.0.1) and a client certificate, and a
    // second CA whose client certificate the server must refuse.
    const std::string script = "set -e; cd " + dir_ + R"(
      key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:prime256v1 -out "$1" 2>/dev/null; }
      ca() { key "$1.key"; openssl req -x509 -new -key "$1.key" -out "$1.pem" -days 2 -subj "/CN=$1" 2>/dev/null; }
      leaf() {  # name ca ext
        key "$1.key"
        openssl req -new -key "$1.key" -out "$1.csr" -subj "/CN=$1" 2>/dev/null
        printf '%s\n' "$3" > "$1.ext"
        openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial -out "$1.pem" \
          -days 2 -extfile "$1.ext" 2>/dev/null
      }
      ca ca; ca other-ca
      leaf server ca "subjectAltName=DNS:localhost,IP:127.0.0.1"
      leaf client ca "extendedKeyUsage=clientAuth"
      leaf stranger other-ca "extendedKeyUsage=clientAuth"
      printf 's3cret-token\n' > token
    )";
    ASSERT_EQ(std::system(("bash -c '" + escape(script) + "'").c_str()), 0) << "openssl failed";
  }
  static void TearDownTestSuite() { std::system(("rm -rf " + dir_).c_str()); }

  static std::string escape(const std::string& s) {
    std::string out;
    for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return out;
  }
  static std::string file(const char* name) { return dir_ + "/" + name; }

  static ClientOptions tls_client(const char* cert = nullptr) {
    ClientOptions o;
    o.tls = true;
    o.tls_ca_file = file("ca.pem");
    o.tls_server_name = "localhost";
    o.timeout = std::chrono::seconds(10);
    if (cert) {
      o.tls_cert_file = file((std::string(cert) + ".pem").c_str());
      o.tls_key_file = file((std::string(cert) + ".key").c_str());
    }
    return o;
  }

  static std::string dir_;
};
std::string SecurityTest::dir_;

ClientOptions with_timeout() {
  ClientOptions o;
  o.timeout = std::chrono::seconds(10);
  return o;
}

TEST_F(SecurityTest, TlsServesTlsClientsAndRefusesPlaintext) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--tls-cert", file("server.pem"),
                                             "--tls-key", file("server.key")});
  auto ok = Client(server.address(), tls_client()).server_info();
  EXPECT_TRUE(ok.ok()) << ok.status().to_string() << "\n" << server.log();
  auto plain = Client(server.address(), with_timeout()).server_info();
  EXPECT_FALSE(plain.ok());
  // A client that does not trust the server's CA refuses it.
  ClientOptions wrong_ca = tls_client();
  wrong_ca.tls_ca_file = file("other-ca.pem");
  EXPECT_FALSE(Client(server.address(), wrong_ca).server_info().ok());
  EXPECT_THAT(server.log(), HasSubstr("TLS, no token"));
}

TEST_F(SecurityTest, MutualTlsNeedsAClientCertificateTheCaSigned) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--tls-cert", file("server.pem"),
                                             "--tls-key", file("server.key"), "--tls-client-ca",
                                             file("ca.pem")});
  auto with_cert = Client(server.address(), tls_client("client")).server_info();
  EXPECT_TRUE(with_cert.ok()) << with_cert.status().to_string() << "\n" << server.log();
  EXPECT_FALSE(Client(server.address(), tls_client()).server_info().ok()) << "no client certificate";
  EXPECT_FALSE(Client(server.address(), tls_client("stranger")).server_info().ok())
      << "a certificate from another CA";
  EXPECT_THAT(server.log(), HasSubstr("mutual TLS"));
}

TEST_F(SecurityTest, TlsFlagsThatCannotWorkStopTheStart) {
  EXPECT_THROW(testing::ServerProcess(ATTND_PATH, {"--backend", "cpu", "--tls-cert", file("server.pem")}),
               std::runtime_error);
  EXPECT_THROW(testing::ServerProcess(ATTND_PATH, {"--backend", "cpu", "--tls-cert", file("nope.pem"),
                                                   "--tls-key", file("server.key")}),
               std::runtime_error);
}

// Every AttnService method, called with the given token (empty: none).
std::vector<grpc::StatusCode> call_every_method(const std::string& address, const std::string& token) {
  auto stub = v1::AttnService::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  std::vector<grpc::StatusCode> codes;
  auto ctx = [&] {
    auto c = std::make_unique<grpc::ClientContext>();
    if (!token.empty()) c->AddMetadata("authorization", token);
    return c;
  };
  v1::MatmulResponse mm;
  codes.push_back(stub->Matmul(ctx().get(), {}, &mm).error_code());
  v1::SoftmaxResponse sm;
  codes.push_back(stub->Softmax(ctx().get(), {}, &sm).error_code());
  v1::AttentionResponse at;
  codes.push_back(stub->Attention(ctx().get(), {}, &at).error_code());
  v1::ListKernelsResponse lk;
  codes.push_back(stub->ListKernels(ctx().get(), {}, &lk).error_code());
  v1::GetServerInfoResponse si;
  codes.push_back(stub->GetServerInfo(ctx().get(), {}, &si).error_code());
  {
    auto c = ctx();
    v1::PutTensorResponse put;
    auto writer = stub->PutTensor(c.get(), &put);
    writer->WritesDone();
    codes.push_back(writer->Finish().error_code());
  }
  {
    auto c = ctx();
    auto reader = stub->GetTensor(c.get(), {});
    v1::GetTensorResponse msg;
    while (reader->Read(&msg)) {
    }
    codes.push_back(reader->Finish().error_code());
  }
  v1::DeleteTensorResponse del;
  codes.push_back(stub->DeleteTensor(ctx().get(), {}, &del).error_code());
  v1::ListTensorsResponse lt;
  codes.push_back(stub->ListTensors(ctx().get(), {}, &lt).error_code());
  v1::BenchmarkResponse bm;
  codes.push_back(stub->Benchmark(ctx().get(), {}, &bm).error_code());
  v1::EchoResponse echo;
  codes.push_back(stub->Echo(ctx().get(), {}, &echo).error_code());
  v1::CreateKvCacheResponse ckv;
  codes.push_back(stub->CreateKvCache(ctx().get(), {}, &ckv).error_code());
  v1::DescribeKvCacheResponse dkv;
  codes.push_back(stub->DescribeKvCache(ctx().get(), {}, &dkv).error_code());
  v1::ListKvCachesResponse lkv;
  codes.push_back(stub->ListKvCaches(ctx().get(), {}, &lkv).error_code());
  v1::DeleteKvCacheResponse delkv;
  codes.push_back(stub->DeleteKvCache(ctx().get(), {}, &delkv).error_code());
  v1::ReleaseSequencesResponse rel;
  codes.push_back(stub->ReleaseSequences(ctx().get(), {}, &rel).error_code());
  v1::ForkSequenceResponse fork;
  codes.push_back(stub->ForkSequence(ctx().get(), {}, &fork).error_code());
  v1::TruncateSequenceResponse truncate;
  codes.push_back(stub->TruncateSequence(ctx().get(), {}, &truncate).error_code());
  v1::DecodeResponse dec;
  codes.push_back(stub->Decode(ctx().get(), {}, &dec).error_code());
  v1::PrefillResponse pre;
  codes.push_back(stub->Prefill(ctx().get(), {}, &pre).error_code());
  {
    auto c = ctx();
    auto reader = stub->ReadKv(c.get(), {});
    v1::ReadKvResponse msg;
    while (reader->Read(&msg)) {
    }
    codes.push_back(reader->Finish().error_code());
  }
  v1::RegisterSharedMemoryResponse reg;
  codes.push_back(stub->RegisterSharedMemory(ctx().get(), {}, &reg).error_code());
  v1::UnregisterSharedMemoryResponse unreg;
  codes.push_back(stub->UnregisterSharedMemory(ctx().get(), {}, &unreg).error_code());
  v1::SharedMemoryStatusResponse shm_status;
  codes.push_back(stub->SharedMemoryStatus(ctx().get(), {}, &shm_status).error_code());
  // A method added to the service must be added here too.
  EXPECT_EQ(static_cast<std::size_t>(google::protobuf::DescriptorPool::generated_pool()
                                         ->FindServiceByName("attn.v1.AttnService")
                                         ->method_count()), codes.size());
  return codes;
}

void expect_token_enforced(const testing::ServerProcess& server) {
  using ::testing::Each;
  using ::testing::Eq;
  using ::testing::Not;
  EXPECT_THAT(call_every_method(server.address(), ""), Each(Eq(grpc::StatusCode::UNAUTHENTICATED)));
  EXPECT_THAT(call_every_method(server.address(), "Bearer wrong"), Each(Eq(grpc::StatusCode::UNAUTHENTICATED)));
  EXPECT_THAT(call_every_method(server.address(), "Bearer s3cret-tokenX"), Each(Eq(grpc::StatusCode::UNAUTHENTICATED)));
  EXPECT_THAT(call_every_method(server.address(), "Basic s3cret-token"), Each(Eq(grpc::StatusCode::UNAUTHENTICATED)));
  // The right token passes (the empty requests then fail validation, not authentication).
  EXPECT_THAT(call_every_method(server.address(), "Bearer s3cret-token"),
              Each(Not(Eq(grpc::StatusCode::UNAUTHENTICATED))));

  ClientOptions o = with_timeout();
  o.token = "s3cret-token";
  Tensor x = Tensor::from_floats(DType::kFloat32, {2}, {0.0f, 0.0f});
  auto r = Client(server.address(), o).softmax(x);
  ASSERT_TRUE(r.ok()) << r.status().to_string();
  EXPECT_FLOAT_EQ(r->output.get(1), 0.5f);

  // Probes need no token: health and reflection.
  auto channel = grpc::CreateChannel(server.address(), grpc::InsecureChannelCredentials());
  grpc::ClientContext hctx;
  grpc::health::v1::HealthCheckResponse health;
  EXPECT_TRUE(grpc::health::v1::Health::NewStub(channel)->Check(&hctx, {}, &health).ok());
  EXPECT_EQ(health.status(), grpc::health::v1::HealthCheckResponse::SERVING);
  using namespace grpc::reflection::v1alpha;
  grpc::ClientContext rctx;
  auto stream = ServerReflection::NewStub(channel)->ServerReflectionInfo(&rctx);
  ServerReflectionRequest req;
  req.set_list_services("");
  ASSERT_TRUE(stream->Write(req));
  ServerReflectionResponse resp;
  ASSERT_TRUE(stream->Read(&resp));
  EXPECT_GT(resp.list_services_response().service_size(), 0);
  stream->WritesDone();
  stream->Finish();
}

TEST_F(SecurityTest, TokenFromAFileIsCheckedOnEveryCall) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--token-file", file("token")});
  expect_token_enforced(server);
  EXPECT_THAT(server.log(), HasSubstr("bearer token required"));
  EXPECT_THAT(server.log(), ::testing::Not(HasSubstr("s3cret")));
}

TEST_F(SecurityTest, TokenFromTheEnvironment) {
  testing::ServerProcessOptions env;
  env.env = {{"ATTND_TOKEN", "s3cret-token"}};
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu"}, env);
  expect_token_enforced(server);
}

TEST_F(SecurityTest, TokenWorksOverMutualTls) {
  testing::ServerProcess server(ATTND_PATH, {"--backend", "cpu", "--tls-cert", file("server.pem"),
                                             "--tls-key", file("server.key"), "--tls-client-ca",
                                             file("ca.pem"), "--token-file", file("token")});
  ClientOptions o = tls_client("client");
  EXPECT_EQ(Client(server.address(), o).server_info().status().code(), StatusCode::kUnauthenticated);
  o.token = "s3cret-token";
  auto r = Client(server.address(), o).server_info();
  EXPECT_TRUE(r.ok()) << r.status().to_string();
}

TEST_F(SecurityTest, NoTokenOnTheCommandLineAndEmptyTokenFilesRefused) {
  // A --token flag would show the secret in `ps`: there is none.
  const std::string cmd = std::string(ATTND_PATH) + " --token abc --listen 127.0.0.1:0 >/dev/null 2>&1";
  EXPECT_NE(std::system(cmd.c_str()), 0);
  std::ofstream(file("empty-token")) << "\n";
  EXPECT_THROW(testing::ServerProcess(ATTND_PATH, {"--backend", "cpu", "--token-file", file("empty-token")}),
               std::runtime_error);
}

TEST_F(SecurityTest, WarnsWhenOpenBeyondLoopbackWithoutTlsOrToken) {
  testing::ServerProcessOptions any;
  any.listen = "0.0.0.0:0";
  {
    testing::ServerProcess open(ATTND_PATH, {"--backend", "cpu"}, any);
    EXPECT_THAT(open.log(), HasSubstr("beyond loopback with neither TLS nor a token"));
  }
  {
    testing::ServerProcess guarded(ATTND_PATH, {"--backend", "cpu", "--token-file", file("token")}, any);
    EXPECT_THAT(guarded.log(), ::testing::Not(HasSubstr("beyond loopback")));
  }
  testing::ServerProcess local(ATTND_PATH, {"--backend", "cpu"});
  EXPECT_THAT(local.log(), ::testing::Not(HasSubstr("beyond loopback")));
}

}  // namespace
}  // namespace attn

// PutTensor / GetTensor / DeleteTensor / ListTensors: resident tensors.
#include "handlers/tensor_handlers.h"

#include <spdlog/spdlog.h>

#include "handlers/handler_support.h"
#include "state/tensor_store.h"

namespace attn::server {

namespace {

void describe(const TensorStore& store, const ResidentTensor& t, v1::TensorInfo* out) {
  out->set_handle(t.handle);
  out->set_dtype(wire::to_proto(t.dtype));
  out->mutable_shape()->Assign(t.shape.begin(), t.shape.end());
  out->set_bytes(static_cast<std::int64_t>(t.bytes));
  out->set_device(t.owner->device().label());
  out->set_expires_unix_ms(unix_ms(store.expires(t)));
}

// Header first, then chunks written straight into the resident buffer; published at the end
// when every byte came.
class PutTensorReactor final : public grpc::ServerReadReactor<v1::PutTensorRequest> {
 public:
  PutTensorReactor(const ServiceCore& core, grpc::CallbackServerContext* ctx,
                   v1::PutTensorResponse* resp)
      : core_(core), ctx_(ctx), resp_(resp) {
    StartRead(&req_);
  }
  void OnReadDone(bool ok) override {
    if (!ok) return done();
    Status s = req_.has_header() ? header() : chunk();
    if (!s.ok()) return fail(s);
    StartRead(&req_);
  }
  void OnDone() override { delete this; }

 private:
  Status header() {
    if (tensor_)
      return invalid_argument("header: expected once, at the start of the stream, got a second");
    const v1::TensorHeader& h = req_.header();
    ATTN_ASSIGN_OR_RETURN(dtype, wire::dtype_from_proto(h.dtype(), "header.dtype"));
    if (h.shape_size() == 0)
      return invalid_argument("header.shape: expected at least one dimension, got none");
    ATTN_ASSIGN_OR_RETURN(executor, core_.place(h.device()));
    ATTN_ASSIGN_OR_RETURN(
        t, core_.config.store->create(dtype, Shape(h.shape().begin(), h.shape().end()), h.ttl_ms(),
                                      executor, "header"));
    tensor_ = std::move(t);
    return Status::Ok();
  }
  Status chunk() {
    if (!tensor_)
      return invalid_argument("header: expected the first message to be the header, got a chunk");
    const std::string& c = req_.chunk();
    if (written_ + c.size() > tensor_->bytes) {
      return invalid_argument("chunk: the header's shape holds " + std::to_string(tensor_->bytes) +
                              " bytes, the chunks bring more (" +
                              std::to_string(written_ + c.size()) + ")");
    }
    ATTN_RETURN_IF_ERROR(tensor_->owner->write(tensor_->data, written_, c.data(), c.size()));
    written_ += c.size();
    return Status::Ok();
  }
  void done() {
    if (!tensor_) return fail(invalid_argument("header: expected a header, got an empty stream"));
    if (written_ != tensor_->bytes) {
      return fail(invalid_argument("chunk: the header's shape holds " +
                                   std::to_string(tensor_->bytes) + " bytes, the stream brought " +
                                   std::to_string(written_)));
    }
    core_.config.store->publish(tensor_);
    describe(*core_.config.store, *tensor_, resp_->mutable_tensor());
    spdlog::debug("PutTensor {} {} on {}", tensor_->handle, shape_to_string(tensor_->shape),
                  tensor_->owner->device().label());
    Finish(grpc::Status::OK);
  }
  void fail(const Status& s) {
    spdlog::warn("PutTensor from {} failed: {}", ctx_->peer(), s.to_string());
    tensor_.reset();  // frees the memory and the quota
    Finish(wire::to_grpc(s));
  }

  const ServiceCore& core_;
  grpc::CallbackServerContext* ctx_;
  v1::PutTensorResponse* resp_;
  v1::PutTensorRequest req_;
  std::shared_ptr<ResidentTensor> tensor_;
  std::size_t written_ = 0;
};

// The header, then chunks read from the device one at a time as the client takes them.
class GetTensorReactor final : public grpc::ServerWriteReactor<v1::GetTensorResponse> {
 public:
  GetTensorReactor(const TensorStore& store, std::shared_ptr<ResidentTensor> t,
                   std::size_t chunk_bytes)
      : tensor_(std::move(t)), chunk_bytes_(chunk_bytes) {
    describe(store, *tensor_, msg_.mutable_tensor());
    StartWrite(&msg_);
  }
  void OnWriteDone(bool ok) override {
    if (!ok) return Finish(grpc::Status(grpc::StatusCode::CANCELLED, "the client went away"));
    if (sent_ == tensor_->bytes) return Finish(grpc::Status::OK);
    const std::size_t n = std::min(chunk_bytes_, tensor_->bytes - sent_);
    std::string* chunk = msg_.mutable_chunk();
    chunk->resize(n);
    const Status s = tensor_->owner->read(chunk->data(), tensor_->data, sent_, n);
    if (!s.ok()) return Finish(wire::to_grpc(s));
    sent_ += n;
    StartWrite(&msg_);
  }
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<ResidentTensor> tensor_;  // held while the stream runs, even if deleted meanwhile
  std::size_t chunk_bytes_;
  std::size_t sent_ = 0;
  v1::GetTensorResponse msg_;
};

}  // namespace

grpc::ServerReadReactor<v1::PutTensorRequest>* TensorHandlers::PutTensor(
    grpc::CallbackServerContext* ctx, v1::PutTensorResponse* resp) {
  if (Status s = core_.token.check(*ctx); !s.ok())
    return new Refused<grpc::ServerReadReactor<v1::PutTensorRequest>>(s);
  if (!core_.config.store) {
    return new Refused<grpc::ServerReadReactor<v1::PutTensorRequest>>(
        failed_precondition("PutTensor: this server keeps no resident tensors"));
  }
  return new PutTensorReactor(core_, ctx, resp);
}

grpc::ServerWriteReactor<v1::GetTensorResponse>* TensorHandlers::GetTensor(
    CallContext& /*call*/, const v1::GetTensorRequest* req) {
  using Base = grpc::ServerWriteReactor<v1::GetTensorResponse>;
  if (!core_.config.store)
    return new Refused<Base>(
        failed_precondition("GetTensor: this server keeps no resident tensors"));
  if (req->chunk_bytes() < 0 || req->chunk_bytes() > core_.config.max_message_bytes / 2) {
    return new Refused<Base>(invalid_argument("chunk_bytes: expected 0 (1 MiB) to " +
                                              std::to_string(core_.config.max_message_bytes / 2) +
                                              ", got " + std::to_string(req->chunk_bytes())));
  }
  auto t = core_.config.store->find(req->handle(), "handle");
  if (!t.ok()) return new Refused<Base>(t.status());
  const std::size_t chunk =
      req->chunk_bytes() == 0 ? std::size_t{1} << 20 : static_cast<std::size_t>(req->chunk_bytes());
  return new GetTensorReactor(*core_.config.store, std::move(t).value(), chunk);
}

grpc::ServerUnaryReactor* TensorHandlers::DeleteTensor(CallContext& call,
                                                       const v1::DeleteTensorRequest* req,
                                                       v1::DeleteTensorResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  if (!core_.config.store) {
    core_.finish(call, reactor, "",
                 failed_precondition("DeleteTensor: this server keeps no resident tensors"),
                 nullptr, 0);
    return reactor;
  }
  auto freed = core_.config.store->erase(req->handle());
  if (freed.ok()) resp->set_freed_bytes(static_cast<std::int64_t>(*freed));
  core_.finish(call, reactor, "", freed.status(), nullptr, 0);
  return reactor;
}

grpc::ServerUnaryReactor* TensorHandlers::ListTensors(CallContext& call,
                                                      const v1::ListTensorsRequest*,
                                                      v1::ListTensorsResponse* resp) {
  auto* reactor = call.grpc->DefaultReactor();
  if (core_.config.store) {
    for (const auto& l : core_.config.store->list()) {
      v1::TensorInfo* info = resp->add_tensors();
      describe(*core_.config.store, *l.tensor, info);
      info->set_expires_unix_ms(unix_ms(l.expires));
    }
    resp->set_used_bytes(static_cast<std::int64_t>(core_.config.store->used_bytes()));
    resp->set_quota_bytes(static_cast<std::int64_t>(core_.config.store->quota_bytes()));
  }
  core_.finish(call, reactor, "", Status::Ok(), nullptr, 0);
  return reactor;
}

}  // namespace attn::server

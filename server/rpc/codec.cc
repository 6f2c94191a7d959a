#include "rpc/codec.h"

#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/wire_format_lite.h>

#include <thread>
#include <vector>

#include "attn/tensor.h"
#include "attn/v1/attn.pb.h"

namespace attn::server {
namespace {

// A request's bytes as gRPC received them (a chain of slices), handed to the parser one slice at a
// time, each let go as soon as the parser has moved past it (protobuf keeps no pointer into a
// buffer once it asks for the next), so the request never exists twice in full.
class ConsumingSliceStream final : public google::protobuf::io::ZeroCopyInputStream {
 public:
  explicit ConsumingSliceStream(grpc::ByteBuffer& buffer) {
    (void)buffer.Dump(&slices_);  // references, not copies; fails only on a compressed buffer
    buffer.Clear();
  }
  bool Next(const void** data, int* size) override {
    if (backed_up_ > 0) {
      const grpc::Slice& s = slices_[next_ - 1];
      *data = s.end() - backed_up_;
      *size = backed_up_;
      position_ += backed_up_;
      backed_up_ = 0;
      return true;
    }
    if (next_ > 0) slices_[next_ - 1] = grpc::Slice();
    if (next_ == slices_.size()) return false;
    const grpc::Slice& s = slices_[next_++];
    *data = s.begin();
    *size = static_cast<int>(s.size());
    position_ += static_cast<std::int64_t>(s.size());
    return true;
  }
  void BackUp(int count) override {
    backed_up_ = count;
    position_ -= count;
  }
  bool Skip(int count) override {
    const void* data;
    int size;
    while (count > 0) {
      if (!Next(&data, &size)) return false;
      if (size > count) {
        BackUp(size - count);
        return true;
      }
      count -= size;
    }
    return true;
  }
  std::int64_t ByteCount() const override { return position_; }

 private:
  std::vector<grpc::Slice> slices_;
  std::size_t next_ = 0;
  int backed_up_ = 0;
  std::int64_t position_ = 0;
};

bool is_tensor(const google::protobuf::FieldDescriptor* f) {
  return f->type() == google::protobuf::FieldDescriptor::TYPE_MESSAGE && !f->is_repeated() &&
         f->message_type() == v1::Tensor::descriptor();
}

}  // namespace

// A large request's big fields (its Tensors' data) are read into strings that already have room
// for them: protobuf would otherwise grow them by doubling, and a 1 GB field would exist twice
// while it is copied to its next size. The room is address space (the pages are touched only as
// bytes arrive). Tensor fields the request did not carry are left unset as before.
bool parse_large(grpc::ByteBuffer& buffer, std::size_t size, google::protobuf::Message& message) {
  const auto* descriptor = message.GetDescriptor();
  const auto* reflection = message.GetReflection();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const auto* f = descriptor->field(i);
    if (!is_tensor(f)) continue;
    std::string* data =
        static_cast<v1::Tensor*>(reflection->MutableMessage(&message, f))->mutable_data();
    data->reserve(size);
    advise_huge_pages(data->data(), data->capacity());
  }
  ConsumingSliceStream stream(buffer);
  google::protobuf::io::CodedInputStream coded(&stream);
  if (!message.MergeFromCodedStream(&coded)) return false;
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const auto* f = descriptor->field(i);
    if (is_tensor(f) && reflection->GetMessage(message, f).ByteSizeLong() == 0)
      reflection->ClearField(&message, f);
  }
  return true;
}

// A response whose large tensors' bytes go out from where the handler wrote them, without a
// serialized copy: the message without them, then for each tensor a second occurrence of its field
// holding only its data (protobuf merges repeated occurrences of a message field, so every parser
// reads the same message). The strings live until gRPC has sent them.
grpc::Status serialize_large(google::protobuf::Message& message, grpc::ByteBuffer* out) {
  using google::protobuf::internal::WireFormatLite;
  const auto* descriptor = message.GetDescriptor();
  const auto* reflection = message.GetReflection();
  const auto* data_field = v1::Tensor::descriptor()->FindFieldByName("data");
  struct Taken {
    int field;
    std::string* bytes;
  };
  std::vector<Taken> taken;
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const auto* f = descriptor->field(i);
    if (!is_tensor(f) || !reflection->HasField(message, f)) continue;
    auto* tensor = static_cast<v1::Tensor*>(reflection->MutableMessage(&message, f));
    if (tensor->data().size() < kLargeMessageBytes) continue;
    auto* bytes = new std::string;
    tensor->mutable_data()->swap(*bytes);
    taken.push_back({f->number(), bytes});
  }
  std::vector<grpc::Slice> slices;
  slices.emplace_back(message.SerializeAsString());
  for (const Taken& t : taken) {
    std::string frame;
    google::protobuf::io::StringOutputStream frame_stream(&frame);
    {
      google::protobuf::io::CodedOutputStream coded(&frame_stream);
      const std::uint32_t n = static_cast<std::uint32_t>(t.bytes->size());
      coded.WriteTag(WireFormatLite::MakeTag(t.field, WireFormatLite::WIRETYPE_LENGTH_DELIMITED));
      const std::uint32_t data_tag =
          WireFormatLite::MakeTag(data_field->number(), WireFormatLite::WIRETYPE_LENGTH_DELIMITED);
      coded.WriteVarint32(static_cast<std::uint32_t>(
                              google::protobuf::io::CodedOutputStream::VarintSize32(data_tag) +
                              google::protobuf::io::CodedOutputStream::VarintSize32(n)) +
                          n);
      coded.WriteTag(data_tag);
      coded.WriteVarint32(n);
    }
    slices.emplace_back(std::move(frame));
    // gRPC lets go of it on its own thread: unmapping a GB takes ~50 ms, which are not its to
    // spend.
    slices.emplace_back(
        t.bytes->data(), t.bytes->size(),
        [](void* s) { std::thread([s] { delete static_cast<std::string*>(s); }).detach(); },
        t.bytes);
  }
  *out = grpc::ByteBuffer(slices.data(), slices.size());
  return grpc::Status::OK;
}

}  // namespace attn::server

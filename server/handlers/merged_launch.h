// Dynamic batching's one launch: calls of one op waiting together (same batch key) run as one
// call of the kernel library. Each call's tensors are stacked along the op's batch axis, the
// union runs once, and each call gets its rows of the outputs back: the bits it would have had
// alone, since a row's result does not depend on the other rows.
//
// What differs by op is its batch spec (Merging<Args> for the one-shot ops, KvMerging<Args> for
// Decode and Prefill): the key of calls that can share a launch, the tensors that stack and along
// which axis, and how the union's arguments are finished (a mask that one row no longer needs, a
// plan over every call's sequences). A call taking part provides launch_args(), run_alone() (the
// union cannot run: each runs as it would have alone), undo_together() (the launch failed: what
// the call changed goes back, before any call is answered), fail() and ran_together().
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

#include "attn/registry.h"
#include "attn/tensor.h"
#include "handlers/service_core.h"

namespace attn::server {

// The part of a batch key that sinks (AttentionArgs::sinks, in host memory) add: "" for none, else
// their bytes in hex, so that only calls with the same sink values (bit for bit) share a launch.
std::string sinks_key(const TensorView& sinks);

// The parts stacked along `axis` (every other dimension equal) into one tensor in host memory.
Tensor stack(const std::vector<TensorView>& parts, int axis);
// A zero-filled tensor of the parts' stacked shape, for an output.
Tensor stacked_shape(const std::vector<TensorView>& parts, int axis);
// The inverse of stack: each part's rows of `whole` copied into the part.
void unstack(const TensorView& whole, const std::vector<TensorView>& parts, int axis);

// Runs `calls` (two or more) as one launch; `waits` is each one's time in the queue.
template <class Spec, class Call>
void run_merged(const ServiceCore& core, Executor& executor, const std::vector<Call*>& calls,
                const std::vector<std::int64_t>& waits) {
  using Args = typename Spec::Args;
  const auto begin = std::chrono::steady_clock::now();
  Args all = calls.front()->launch_args();
  std::vector<Tensor> storage;
  storage.reserve(Spec::kInputs.size() + Spec::kOutputs.size());
  std::vector<TensorView> parts;
  auto parts_of = [&](TensorView Args::*field) {
    parts.clear();
    for (Call* c : calls) parts.push_back(Spec::rows(c->launch_args().*field));
    return !parts.front().empty();  // an optional tensor (lse) absent from every call of the key
  };
  for (TensorView Args::*in : Spec::kInputs)
    if (parts_of(in)) all.*in = storage.emplace_back(stack(parts, Spec::kAxis)).view();
  for (TensorView Args::*out : Spec::kOutputs)
    if (parts_of(out)) all.*out = storage.emplace_back(stacked_shape(parts, Spec::kAxis)).view();
  typename Spec::Union together;
  auto variant = Spec::unite(calls, all, together, core.registry, executor.target());
  if (!variant.ok()) {  // no variant takes the union here: each runs alone
    for (std::size_t i = 0; i < calls.size(); ++i) calls[i]->run_alone(executor, waits[i]);
    return;
  }
  const VariantInfo& ran = (*variant)->info;
  ExecTimings t;
  t.prepare_ns =
      std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - begin)
          .count();  // the stacking and the union's plan
  const Status status = executor.execute(make_call(**variant, all), t);
  if (!status.ok()) {
    core.device_faulted(executor, ran.name, status);
    for (std::size_t i = calls.size(); i-- > 0;) calls[i]->undo_together();
    for (Call* c : calls) c->fail(status);
    return;
  }
  if (core.config.metrics) core.config.metrics->record_batch(OpDesc<Args>::kName, calls.size());
  for (TensorView Args::*out : Spec::kOutputs)
    if (parts_of(out)) unstack(all.*out, parts, Spec::kAxis);
  for (std::size_t i = 0; i < calls.size(); ++i)
    calls[i]->ran_together(executor, t, waits[i], static_cast<int>(calls.size()), ran);
}

}  // namespace attn::server

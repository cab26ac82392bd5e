// The FFN activations of the kernels, by the names transformers' ACT2FN gives them (as
// reference.ACTS): fp32 in, fp32 out; the callers round where a tensor operation would store.
#pragma once

#include <torch/extension.h>

#include "bf16.h"

#include <algorithm>
#include <cmath>
#include <string>

namespace {

enum class Act { kRelu, kSilu, kGelu, kGeluTanh };

Act act_of(const std::string& name) {
  if (name == "relu") return Act::kRelu;
  if (name == "silu") return Act::kSilu;
  if (name == "gelu_pytorch_tanh") return Act::kGeluTanh;
  TORCH_CHECK(name == "gelu", "act must be relu, silu, gelu or gelu_pytorch_tanh, got ", name);
  return Act::kGelu;
}

inline float apply(Act act, float v) {
  switch (act) {
    case Act::kRelu: return std::max(v, 0.f);
    case Act::kSilu: return v / (1.f + std::exp(-v));
    case Act::kGeluTanh: return 0.5f * v * (1.f + std::tanh(0.7978845608f * (v + 0.044715f * v * v * v)));
    default: return 0.5f * v * (1.f + std::erf(v * 0.70710678f));
  }
}

// The dense formula's h_i from gate and up values g, u (rounded to T): act(g) * (act(u) when
// act_up, else u), each value rounded to T where the reference's tensor operations store it.
template <typename T>
inline float dense_h(Act act, bool act_up, float g, float u) {
  using turbo_demo::rounded;
  return rounded<T>(rounded<T>(apply(act, g)) * (act_up ? rounded<T>(apply(act, u)) : u));
}

}  // namespace

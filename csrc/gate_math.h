// The gate math moved to csrc/rnn/cells.h (the cell policies) and the scalar exp, sigmoid and
// tanh to csrc/fast_math.h. This header only keeps the old names for the files that still include
// it (csrc/cpu/attention.cpp, csrc/cpu/gpt2_decode.cpp); new code includes fast_math.h.
#pragma once

#include "fast_math.h"

namespace genfast {
namespace gates {

using math::exp_;
using math::exp_fast;
using math::sigmoid;
using math::tanh_;

}  // namespace gates
}  // namespace genfast

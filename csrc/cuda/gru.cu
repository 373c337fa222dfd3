// The fused GRU time-step kernels: csrc/cuda/rnn_step.cuh for rnn::GruCell.
#include "rnn_step.cuh"

namespace genfast {
namespace cuda {
GENFAST_INSTANTIATE_RNN_STEP(rnn::GruCell)
}  // namespace cuda
}  // namespace genfast

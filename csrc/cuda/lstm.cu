// The fused LSTM time-step kernels: csrc/cuda/rnn_step.cuh for rnn::LstmCell.
#include "rnn_step.cuh"

namespace genfast {
namespace cuda {
GENFAST_INSTANTIATE_RNN_STEP(rnn::LstmCell)
}  // namespace cuda
}  // namespace genfast

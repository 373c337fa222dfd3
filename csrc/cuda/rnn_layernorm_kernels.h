// Launchers for the CUDA kernels of the layer-normalised LSTM and GRU (rnn::LayerNormLstmCell,
// rnn::LayerNormGruCell, csrc/rnn/layernorm_cells.h; kernels in csrc/cuda/rnn_layernorm.cu, time loop in
// csrc/cuda/rnn_layernorm_glue.cpp). torch-free: raw device pointers, sizes and a stream.
//
// LN needs the moments of a whole row while the gates are per unit, so every kernel here runs one
// block per row of the batch (or of the sequence): the block's threads stride over the row's units,
// reduce the moments (two passes, mean then squared deviations, in AccT<T>) and then apply the cell's
// scalar math from layernorm_cells.h, the same as the CPU's. A thread handles the same units in every
// loop of a kernel, so the per-row values it keeps in the AccT<T> scratch rows are its own.
//
// Per forward step: product = h_{t-1} W_hh^T (cuBLAS, from the glue) -> ln_*_forward_step: LN of the
// product (normalised in place: the workspace's xhat_hh), the gates, (LSTM) c_t, LN(c~_t) and h_t,
// zoneout and h_t * r. Per backward step: ln_*_backward_step: dL/dh_t, the cell's backward, the
// recurrent LN's backward into d_product = dL/d(W_hh (h_{t-1} * r)); the glue then adds d_product W_hh
// (times r) to dL/dh_{t-1}. The input side's LN is one launch over all rows before the forward loop
// (layer_norm_rows_forward) and after the backward loop (layer_norm_rows_backward).
//
// Workspace layout, saved values and regularisers: as the CPU kernel (csrc/cpu/rnn_layernorm.cpp),
// so the autograd and fake kernels are shared: the cell slot holds the carried c_t (under cell
// zoneout, the zoned one), cell_hat LN(c~_t).
#pragma once

#include <cstdint>

#include "rnn_kernels.h"

namespace genfast {
namespace cuda {

// Row-wise LN of the input side, in place: v <- LN(v) gain + bias.
template <typename T>
struct LayerNormRowsArgs {
  int64_t rows = 0;
  int64_t width = 0;         // W values per row
  T* values = nullptr;       // rows x W, in place
  const T* gain = nullptr;   // W
  const T* bias = nullptr;   // W or null
  T* xhat = nullptr;         // rows x W: LN(v) before its gain, or null
  T* rstd = nullptr;         // rows, or null
};

// The backward of the above, in place: d (dL/d(LN(v) gain), rows x W) <- dL/dv.
template <typename T>
struct LayerNormRowsBackwardArgs {
  int64_t rows = 0;
  int64_t width = 0;
  T* d = nullptr;
  const T* gain = nullptr;
  const T* xhat = nullptr;  // rows x W
  const T* rstd = nullptr;  // rows
};

template <typename T>
struct LnForwardStepArgs {
  int64_t rows = 0;              // active batch rows at this step
  int64_t hidden = 0;            // H
  const T* gates_x = nullptr;    // rows x G*H: LN(W_ih x) ln_ih_weight + bias (LSTM b_ih + b_hh; GRU b_ih)
  T* product = nullptr;          // rows x G*H: W_hh h_{t-1}, raw in, LN(.) before its gain out
  const T* gamma_hh = nullptr;   // G*H: ln_hh_weight
  const T* b_hh = nullptr;       // GRU: G*H recurrent bias, or null
  const T* gamma_c = nullptr;    // LSTM: H ln_cell_weight
  const T* beta_c = nullptr;     // LSTM: H ln_cell_bias
  AccT<T>* c_state = nullptr;    // LSTM: batch x H, c_{t-1} in, the carried c_t out
  AccT<T>* scratch = nullptr;    // LSTM: batch x 2H, c~_t and o of each row
  T* h_state = nullptr;          // batch x H: the carried h_{t-1} in, h_t out (each thread reads first)
  T* h_out = nullptr;            // rows x H: the output rows of this step
  T* saved = nullptr;            // rows x kSaved*H activated gates, or null (inference)
  T* saved_c = nullptr;          // LSTM: rows x H carried c_t, or null
  T* cell_hat = nullptr;         // LSTM: rows x H LN(c~_t), or null
  T* rstd_hh = nullptr;          // rows, or null
  T* rstd_c = nullptr;           // LSTM: rows, or null
  // Regularisers (csrc/rnn/regularizers.h), each null when off.
  const T* zoneout = nullptr;         // rows x H: the weight of h_{t-1} in h_t
  const T* cell_zoneout = nullptr;    // LSTM: rows x H, the same for c
  const T* recurrent_mask = nullptr;  // batch x H: r
  T* h_masked = nullptr;              // batch x H: receives h_t * r, the next step's product input
};

template <typename T>
struct LnBackwardStepArgs {
  int64_t rows = 0;
  int64_t hidden = 0;             // H
  int64_t prev_rows = 0;          // rows active at the previous forward step; later rows start from hx, cx
  const T* grad_out = nullptr;    // rows x H: dL/doutput
  T* d_h = nullptr;               // batch x H: dL/dh_t from later steps; receives the direct part of
                                  // dL/dh_{t-1} (GRU z dL/dh; zoneout k dL/dh), untouched by an LSTM
                                  // without zoneout (the glue overwrites it with the product)
  AccT<T>* d_c = nullptr;         // LSTM: batch x H, dL/dc_t in, dL/dc_{t-1} out
  const T* saved = nullptr;       // rows x kSaved*H from the forward
  const T* xhat_hh = nullptr;     // rows x G*H
  const T* rstd_hh = nullptr;     // rows
  const T* cell_hat = nullptr;    // LSTM: rows x H
  const T* rstd_c = nullptr;      // LSTM: rows
  const T* gamma_c = nullptr;     // LSTM: H
  const T* beta_c = nullptr;      // LSTM: H
  const T* gamma_hh = nullptr;    // G*H
  const T* c_prev = nullptr;      // LSTM: prev_rows x H, the carried c_{t-1} the forward saved
  const T* cx = nullptr;          // LSTM: batch x H
  const T* output_prev = nullptr; // prev_rows x H: the previous step's output h_{t-1}
  const T* hx = nullptr;          // batch x H
  T* h_prev_dst = nullptr;        // rows x H: h_{t-1} (times r) gathered for W_hh's gradient
  T* d_pre = nullptr;             // rows x G*H: dL/d(input side after its gain) (LSTM: both sides)
  T* d_pre_h = nullptr;           // GRU: rows x G*H, dL/dh^ (the recurrent side after its gain)
  AccT<T>* d_y = nullptr;         // LSTM: rows x H, dL/d(LN(c~) ln_cell_weight + ln_cell_bias)
  T* d_product = nullptr;         // rows x G*H: dL/d(W_hh (h_{t-1} * r))
  AccT<T>* scratch = nullptr;     // batch x G*H: the recurrent side's gradient of each row
  const T* zoneout = nullptr;         // rows x H
  const T* cell_zoneout = nullptr;    // LSTM: rows x H
  const T* recurrent_mask = nullptr;  // batch x H
};

template <typename T>
cudaError_t layer_norm_rows_forward(const LayerNormRowsArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t layer_norm_rows_backward(const LayerNormRowsBackwardArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t ln_lstm_forward_step(const LnForwardStepArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t ln_gru_forward_step(const LnForwardStepArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t ln_lstm_backward_step(const LnBackwardStepArgs<T>& args, cudaStream_t stream);
template <typename T>
cudaError_t ln_gru_backward_step(const LnBackwardStepArgs<T>& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace genfast

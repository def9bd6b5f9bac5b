// Sparse (CSR) weight matrices for XLA:CPU, registered by lottojax/native.py (which compiles
// this file on first use) as two FFI targets.
//
// "lottojax_csr_windows": one matrix applied to shifted windows of a flat input. With G
// groups of C columns (attributes groups, columns) and a group stride S (group_stride):
//
//   y[o, g C + q] = act(bias[o] + sum_{k in row o} values[k] * x[g S + offsets[k] + q]),
//
// for q < C, where row o holds the entries indptr[o] .. indptr[o + 1] - 1, x is any float32
// array read flat, y is (outputs, G C) and act is ReLU when the attribute relu is true.
//   - A stride-1 convolution: x = zero-padded images, channel-major, (B, channels, H', W'):
//     offsets = channel H' W' + dy W' + dx, S = channels H' W', C = H' W', so column q is
//     one pixel of the padded grid (the padding columns are computed and discarded).
//
// "lottojax_csr_chain": a chain of dense layers, h_{l+1} = act_l(h_l @ W_l.T + bias_l), on a
// row-major x = h_0 (batch, inputs), y (batch, outputs of the last layer); the layers come as
// four buffers each (indptr, indices, values, bias), act_l is ReLU where bit l of relu_mask
// is set. Each block of 64 examples is copied feature-major once, runs through every layer
// feature-major (the activations stay in the thread's cache) and is copied back.
//
// Each stored weight adds w * x[... + q0 .. + kTile] to a block of kTile columns of its
// output row, held in eight AVX registers: contiguous multiply-adds, no gathers, nothing
// for zeros. Blocks are independent; large products spread them over the CPU's cores.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kTile = 64;  // columns per block: 8 AVX2 registers of accumulators

struct Csr {
  const int32_t* indptr;
  const int32_t* offsets;
  const float* values;
  const float* bias;
  int64_t outputs;
};

typedef float Vec __attribute__((vector_size(32)));  // 8 floats; GCC and Clang vector extension
constexpr int64_t kVecs = kTile / 8;

inline Vec Load(const float* p) {
  Vec v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

// Output rows [o0, o1) for kTile columns: x and y point at the block's first column,
// y's rows are y_stride apart.
void FullBlock(const Csr& w, const float* x, float* y, int64_t y_stride, int64_t o0, int64_t o1,
               bool relu, int64_t scale = 1) {
  for (int64_t o = o0; o < o1; ++o) {
    Vec acc[kVecs];
    for (int64_t i = 0; i < kVecs; ++i) acc[i] = Vec{} + w.bias[o];
    for (int32_t k = w.indptr[o]; k < w.indptr[o + 1]; ++k) {
      const float v = w.values[k];
      const float* row = x + w.offsets[k] * scale;
      for (int64_t i = 0; i < kVecs; ++i) acc[i] += v * Load(row + 8 * i);
    }
    for (int64_t i = 0; i < kVecs; ++i) {
      const Vec out = relu ? (acc[i] > 0 ? acc[i] : Vec{}) : acc[i];
      __builtin_memcpy(y + o * y_stride + 8 * i, &out, sizeof out);
    }
  }
}

// bias[o] + sum_k values[k] * x[offsets[k]] over row o, in four independent sums (one chain
// of dependent additions would wait on each one's latency).
inline float RowDot(const Csr& w, int64_t o, const float* x, bool relu) {
  float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  int32_t k = w.indptr[o];
  const int32_t end = w.indptr[o + 1];
  for (; k + 4 <= end; k += 4) {
    for (int i = 0; i < 4; ++i) sum[i] += w.values[k + i] * x[w.offsets[k + i]];
  }
  for (; k < end; ++k) sum[0] += w.values[k] * x[w.offsets[k]];
  const float acc = w.bias[o] + ((sum[0] + sum[1]) + (sum[2] + sum[3]));
  return relu ? std::max(acc, 0.0f) : acc;
}

// The same for width < kTile columns, one column at a time.
void NarrowBlock(const Csr& w, const float* x, float* y, int64_t y_stride, int64_t width,
                 int64_t o0, int64_t o1, bool relu) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t j = 0; j < width; ++j) y[o * y_stride + j] = RowDot(w, o, x + j, relu);
  }
}

struct Windows {
  int64_t groups, group_stride, columns;
  int64_t blocks() const { return (columns + kTile - 1) / kTile; }  // per group
};

// dst[c * dst_stride + r] = src[r * src_stride + c] for r < rows, c < cols: 8 x 8 tiles in
// AVX registers where the tiles are whole, one element at a time elsewhere.
void Transpose(const float* src, int64_t src_stride, float* dst, int64_t dst_stride, int64_t rows,
               int64_t cols) {
  int64_t r0 = 0, c0 = 0;
#ifdef __AVX__
  for (; r0 + 8 <= rows; r0 += 8) {
    for (c0 = 0; c0 + 8 <= cols; c0 += 8) {
      __m256 t[8], u[8];
      for (int i = 0; i < 8; ++i) t[i] = _mm256_loadu_ps(src + (r0 + i) * src_stride + c0);
      for (int i = 0; i < 8; i += 2) {
        u[i] = _mm256_unpacklo_ps(t[i], t[i + 1]);
        u[i + 1] = _mm256_unpackhi_ps(t[i], t[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        t[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
        t[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
        t[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
        t[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + (c0 + i) * dst_stride + r0, _mm256_permute2f128_ps(t[i], t[i + 4], 0x20));
        _mm256_storeu_ps(dst + (c0 + i + 4) * dst_stride + r0, _mm256_permute2f128_ps(t[i], t[i + 4], 0x31));
      }
    }
    for (int64_t r = r0; r < r0 + 8; ++r) {  // the columns past the last whole tile
      for (int64_t c = c0; c < cols; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
    }
  }
#endif
  for (int64_t r = r0; r < rows; ++r) {  // the rows past the last whole tile
    for (int64_t c = 0; c < cols; ++c) dst[c * dst_stride + r] = src[r * src_stride + c];
  }
}

// Work unit t of `units` of a windows product: one block of columns of one group or, with
// a single group narrower than a block, a slice of the output rows.
void WindowsUnit(const Csr& w, const float* x, float* y, const Windows& l, bool relu, int64_t t,
                 int64_t units) {
  const int64_t y_stride = l.groups * l.columns;
  if (l.groups == 1 && l.columns < kTile) {
    NarrowBlock(w, x, y, y_stride, l.columns, w.outputs * t / units, w.outputs * (t + 1) / units, relu);
    return;
  }
  const int64_t g = t / l.blocks(), c0 = (t % l.blocks()) * kTile;
  const float* xb = x + g * l.group_stride + c0;
  float* yb = y + g * l.columns + c0;
  const int64_t width = std::min(kTile, l.columns - c0);
  if (width == kTile) {
    FullBlock(w, xb, yb, y_stride, 0, w.outputs, relu);
  } else {
    NarrowBlock(w, xb, yb, y_stride, width, 0, w.outputs, relu);
  }
}

struct Layer {
  Csr w;
  bool relu;
};

// Block g of a chain: examples [g kTile, g kTile + width). A full block is copied
// feature-major (inputs, kTile), computed layer by layer into (outputs, kTile) tiles and
// written back example-major; a narrower one is computed example by example from x itself.
void ChainBlock(const std::vector<Layer>& layers, const float* x, int64_t inputs, float* y,
                int64_t batch, int64_t g) {
  const int64_t b0 = g * kTile, width = std::min(kTile, batch - b0);
  const int64_t outputs = layers.back().w.outputs;
  thread_local std::vector<float> in, out;
  if (width < kTile) {
    for (int64_t b = b0; b < b0 + width; ++b) {
      const float* h = x + b * inputs;
      for (const Layer& l : layers) {
        out.resize(l.w.outputs);
        for (int64_t o = 0; o < l.w.outputs; ++o) out[o] = RowDot(l.w, o, h, l.relu);
        std::swap(in, out);
        h = in.data();
      }
      std::copy(h, h + outputs, y + b * outputs);
    }
    return;
  }
  in.resize(inputs * kTile);
  Transpose(x + b0 * inputs, inputs, in.data(), kTile, kTile, inputs);
  for (const Layer& l : layers) {
    out.resize(l.w.outputs * kTile);
    FullBlock(l.w, in.data(), out.data(), kTile, 0, l.w.outputs, l.relu, kTile);  // input i at i * kTile
    std::swap(in, out);
  }
  Transpose(in.data(), kTile, y + b0 * outputs, outputs, outputs, kTile);
}

// Runs unit(t) for t < units, spread over the CPU's cores when `work` (multiply-adds and
// stores) is worth a thread's start (tens of microseconds): threads of its own, since
// taking XLA's intra-op pool as a context costs several microseconds on every call, as much
// as a whole batch-1 layer.
template <typename Unit>
void Parallel(int64_t units, int64_t work, const Unit& unit) {
  const int64_t helpers = work < (1 << 20) ? 0
                          : std::min<int64_t>(std::thread::hardware_concurrency() - 1, units - 1);
  std::atomic<int64_t> next{0};
  const auto claim = [&] {
    for (int64_t t; (t = next.fetch_add(1)) < units;) unit(t);
  };
  std::vector<std::thread> threads;
  for (int64_t h = 0; h < helpers; ++h) threads.emplace_back(claim);
  claim();
  for (auto& thread : threads) thread.join();
}

// The CSR matrix in these buffers, checked (branch-free: the checks vectorize, a few hundred
// ns per call): indptr runs from 0 to the number of values without decreasing, bias has one
// entry per output, and every offset k satisfies 0 <= offsets[k] < limit.
ffi::ErrorOr<Csr> CheckedCsr(ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> offsets,
                             ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::F32> bias, int64_t limit,
                             const char* what) {
  const Csr w{indptr.typed_data(), offsets.typed_data(), values.typed_data(), bias.typed_data(),
              static_cast<int64_t>(indptr.element_count()) - 1};
  const int64_t nnz = values.element_count();
  if (w.outputs < 0 || bias.element_count() != w.outputs || offsets.element_count() != nnz ||
      w.indptr[0] != 0 || w.indptr[w.outputs] != nnz) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "csr: indptr must have outputs + 1 entries from 0 to the number of values, bias outputs"));
  }
  bool decreases = false;
  for (int64_t o = 0; o < w.outputs; ++o) decreases |= w.indptr[o] > w.indptr[o + 1];
  if (decreases) return ffi::Unexpected(ffi::Error::InvalidArgument("csr: indptr decreases"));
  int32_t lowest = 0, highest = 0;
  for (int64_t k = 0; k < nnz; ++k) {
    lowest = std::min(lowest, w.offsets[k]);
    highest = std::max(highest, w.offsets[k]);
  }
  if (lowest < 0 || (nnz > 0 && highest >= limit)) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(std::string("csr: ") + what));
  }
  return w;
}

ffi::Error CsrWindows(ffi::AnyBuffer x, ffi::Buffer<ffi::S32> indptr, ffi::Buffer<ffi::S32> offsets,
                      ffi::Buffer<ffi::F32> values, ffi::Buffer<ffi::F32> bias, bool relu, int64_t groups,
                      int64_t group_stride, int64_t columns, ffi::ResultBuffer<ffi::F32> y) {
  if (x.element_type() != ffi::F32 || y->dimensions().size() != 2 || groups < 1 || columns < 0 ||
      y->dimensions()[1] != groups * columns || y->dimensions()[0] + 1 != indptr.element_count()) {
    return ffi::Error::InvalidArgument(
        "csr_windows: x must be float32, y (outputs, groups * columns), groups >= 1");
  }
  const Windows l{groups, group_stride, columns};
  const int64_t last = (groups - 1) * group_stride + columns;  // reads reach offset + last
  const auto w = CheckedCsr(indptr, offsets, values, bias, static_cast<int64_t>(x.element_count()) - last + 1,
                            "an offset reads outside x");
  if (w.has_error()) return w.error();
  const int64_t units = groups == 1 && columns < kTile ? std::min<int64_t>(w->outputs, 64) : groups * l.blocks();
  const float* in = x.typed_data<float>();
  float* out = y->typed_data();
  Parallel(units, groups * columns * (values.element_count() + w->outputs),
           [&](int64_t t) { WindowsUnit(*w, in, out, l, relu, t, units); });
  return ffi::Error::Success();
}

ffi::Error CsrChain(ffi::Buffer<ffi::F32> x, ffi::RemainingArgs layer_buffers, int64_t relu_mask,
                    ffi::ResultBuffer<ffi::F32> y) {
  if (x.dimensions().size() != 2 || y->dimensions().size() != 2 || x.dimensions()[0] != y->dimensions()[0] ||
      layer_buffers.size() % 4 != 0 || layer_buffers.empty()) {
    return ffi::Error::InvalidArgument(
        "csr_chain: x (batch, inputs), y (batch, outputs), four buffers per layer");
  }
  const int64_t batch = x.dimensions()[0], inputs = x.dimensions()[1];
  std::vector<Layer> layers;
  int64_t width = inputs, work = 0;
  for (size_t i = 0; i < layer_buffers.size(); i += 4) {
    const auto indptr = layer_buffers.get<ffi::Buffer<ffi::S32>>(i);
    const auto indices = layer_buffers.get<ffi::Buffer<ffi::S32>>(i + 1);
    const auto values = layer_buffers.get<ffi::Buffer<ffi::F32>>(i + 2);
    const auto bias = layer_buffers.get<ffi::Buffer<ffi::F32>>(i + 3);
    if (indptr.has_error() || indices.has_error() || values.has_error() || bias.has_error()) {
      return ffi::Error::InvalidArgument("csr_chain: each layer is indptr, indices (int32), values, bias (float32)");
    }
    const auto w = CheckedCsr(*indptr, *indices, *values, *bias, width, "an input index reads outside x");
    if (w.has_error()) return w.error();
    layers.push_back({*w, ((relu_mask >> (i / 4)) & 1) != 0});
    width = w->outputs;
    work += batch * (values->element_count() + w->outputs);
  }
  if (y->dimensions()[1] != width) {
    return ffi::Error::InvalidArgument("csr_chain: y must have the last layer's outputs");
  }
  const float* in = x.typed_data();
  float* out = y->typed_data();
  Parallel(std::max<int64_t>((batch + kTile - 1) / kTile, 1), work,
           [&](int64_t g) { ChainBlock(layers, in, inputs, out, batch, g); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LottojaxCsrWindows, CsrWindows,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()          // x, read flat
                                  .Arg<ffi::Buffer<ffi::S32>>()   // indptr
                                  .Arg<ffi::Buffer<ffi::S32>>()   // offsets
                                  .Arg<ffi::Buffer<ffi::F32>>()   // values
                                  .Arg<ffi::Buffer<ffi::F32>>()   // bias
                                  .Attr<bool>("relu")
                                  .Attr<int64_t>("groups")
                                  .Attr<int64_t>("group_stride")
                                  .Attr<int64_t>("columns")
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y

XLA_FFI_DEFINE_HANDLER_SYMBOL(LottojaxCsrChain, CsrChain,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x (batch, inputs)
                                  .RemainingArgs()                // per layer: indptr, indices, values, bias
                                  .Attr<int64_t>("relu_mask")
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y (batch, outputs)

// Permute / unpermute kernels with a C++ host side: the "cuda" permute backend
// (moe_dispatch/permute/cuda.py). Same row_id_map format and the same rows, bit for bit, as the
// torch reference (moe_dispatch/permute/reference.py) and the Triton kernels.
//
// Why C++: in eager mode a permute is a few small launches, and from Python each one costs
// tens of microseconds of host time (argument binding, allocation, the Triton launcher). Here one
// call from Python allocates its outputs and queues all its kernels.
//
// Shape legend: N tokens, H hidden, K top-k, E experts, S = N * K slots (flat index n * K + k),
// M output rows, Tc tokens per sort chunk, B = cdiv(N, Tc) chunks, a = align_size.
//
// Permute = a counting sort of the slots by expert fused with the row copy, no host sync unless
// the exact row count is asked for:
//   1. rank_kernel, B blocks of 1024 threads: the rank of every slot among the slots of its chunk
//      with the same expert, in (token, k) order (warp match + one running counter per expert in
//      shared memory, the warps taking turns: deterministic, no atomics), written to row_id_map;
//      hist[b, e] = slots of chunk b with expert e. With one chunk the same block also scans.
//   2. scan_kernel, 1 block: counts[e] = sum_b hist[b, e]; padded starts ps[e] (each group starts
//      at a multiple of a); base[b, e] = ps[e] + sum_{b' < b} hist[b', e]; meta int32 [2, E + 1]
//      = (ps with ps[E] = rows used, counts with counts[E] = valid slots); tokens_per_expert int64
//      [E] = rows of expert e that fit in M.
//   3. permute_kernel, one block per token (plus blocks zeroing padding rows and the rows past the
//      last group): row = base[b, e] + rank, -1 when it falls at or past M; writes row_id_map[n],
//      copies the token once per kept slot (16-byte vectors where alignment allows) and the probs.
// Unpermute: one block per token gathers its K rows and sums p * row in fp32 (k ascending).
// Scatter (unpermute's backward, and permute along a given row_id_map): dx[row] = g[n] * p[n, k],
// zero on rows no slot maps to, and dp[n, k] = <g[n], x[row]> in fp32.
#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace {

constexpr int kRankThreads = 1024;
constexpr int kScanThreads = 1024;
constexpr int kMaxChunks = 256;     // scan: each expert's thread walks the B chunks serially
constexpr int64_t kMaxExperts = 8192;  // shared counters: E int32 (32 KiB)
constexpr int64_t kMaxTopk = 4096;     // permute_kernel keeps a token's K rows in shared memory
constexpr int kZeroTailBlocks = 64;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

#define CUDA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()

// ---------------------------------------------------------------------------------------------
// Block-wide exclusive scan of one int per thread (blockDim.x a multiple of 32, <= 1024).
// ---------------------------------------------------------------------------------------------
__device__ int block_exclusive_scan(int value, int* warp_sums /* shared [32] */, int* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  int inclusive = value;
  for (int d = 1; d < 32; d <<= 1) {
    int other = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += other;
  }
  if (lane == 31) warp_sums[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < nwarps ? warp_sums[lane] : 0;
    int wi = w;
    for (int d = 1; d < 32; d <<= 1) {
      int other = __shfl_up_sync(0xffffffffu, wi, d);
      if (lane >= d) wi += other;
    }
    if (lane < nwarps) warp_sums[lane] = wi - w;  // exclusive prefix of the warp sums
    if (lane == 31) *total = wi;
  }
  __syncthreads();
  int result = warp_sums[warp] + inclusive - value;
  __syncthreads();  // warp_sums may be reused by the caller
  return result;
}

// counts -> padded starts, meta, tokens_per_expert, base. One block; `counts` in shared memory
// (E entries), `ps` shared (E + 1 entries). hist: int32 [B, E] in global memory.
__device__ void scan_block(const int* __restrict__ hist, int B, int E, int align, int64_t M, int* counts, int* ps,
                           int* __restrict__ base, int* __restrict__ meta, int64_t* __restrict__ tokens_per_expert) {
  __shared__ int warp_sums[32];
  __shared__ int total_rows, total_slots;
  // each thread owns a contiguous run of experts: [lo, hi)
  const int per = (E + blockDim.x - 1) / blockDim.x;
  const int lo = min(E, static_cast<int>(threadIdx.x) * per), hi = min(E, lo + per);
  int padded_sum = 0, count_sum = 0;
  for (int e = lo; e < hi; ++e) {
    int c = counts[e];
    padded_sum += (c + align - 1) / align * align;
    count_sum += c;
  }
  int run = block_exclusive_scan(padded_sum, warp_sums, &total_rows);
  block_exclusive_scan(count_sum, warp_sums, &total_slots);
  for (int e = lo; e < hi; ++e) {
    ps[e] = run;
    run += (counts[e] + align - 1) / align * align;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    const int c = counts[e], start = ps[e];
    meta[e] = start;
    meta[E + 1 + e] = c;
    const int64_t room = M - start;
    tokens_per_expert[e] = room <= 0 ? 0 : min(static_cast<int64_t>(c), room);
    int prefix = start;
    for (int b = 0; b < B; ++b) {
      const int h = hist[static_cast<int64_t>(b) * E + e];
      base[static_cast<int64_t>(b) * E + e] = prefix;
      prefix += h;
    }
  }
  if (threadIdx.x == 0) {
    meta[E] = total_rows;
    ps[E] = total_rows;
    meta[E + 1 + E] = total_slots;
  }
}

template <typename id_t>
__global__ void __launch_bounds__(kRankThreads) rank_kernel(
    const id_t* __restrict__ ids, int64_t S, int E, int64_t chunk_slots, int* __restrict__ hist,
    int64_t* __restrict__ rank_out, int align, int64_t M, int* __restrict__ base, int* __restrict__ meta,
    int64_t* __restrict__ tokens_per_expert, bool scan_here) {
  extern __shared__ int shared[];
  int* running = shared;         // [E]
  int* ps = shared + E;          // [E + 1], only when scan_here
  const int b = blockIdx.x;
  for (int e = threadIdx.x; e < E; e += blockDim.x) running[e] = 0;
  __syncthreads();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int64_t begin = static_cast<int64_t>(b) * chunk_slots, end = min(begin + chunk_slots, S);
  for (int64_t r0 = begin; r0 < end; r0 += blockDim.x) {
    const int64_t s = r0 + threadIdx.x;
    int e = -1;
    if (s < end) {
      const int64_t v = static_cast<int64_t>(ids[s]);
      e = (v >= 0 && v < E) ? static_cast<int>(v) : -1;
    }
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    const int before = __popc(peers & ((1u << lane) - 1u));
    // warps take turns on the running counters: slot order = (token, k) order
    for (int w = 0; w < nwarps; ++w) {
      if (warp == w) {
        int start = e >= 0 ? running[e] : 0;
        __syncwarp();
        if (e >= 0 && before == 0) running[e] = start + __popc(peers);
        if (s < end) rank_out[s] = e >= 0 ? start + before : -1;
      }
      __syncthreads();
    }
  }
  for (int e = threadIdx.x; e < E; e += blockDim.x) hist[static_cast<int64_t>(b) * E + e] = running[e];
  if (scan_here) {  // one chunk: hist == running; scan in the same block
    __syncthreads();
    scan_block(hist, 1, E, align, M, running, ps, base, meta, tokens_per_expert);
  }
}

__global__ void __launch_bounds__(kScanThreads) scan_kernel(
    const int* __restrict__ hist, int B, int E, int align, int64_t M, int* __restrict__ base, int* __restrict__ meta,
    int64_t* __restrict__ tokens_per_expert) {
  extern __shared__ int shared[];
  int* counts = shared;     // [E]
  int* ps = shared + E;     // [E + 1]
  for (int e = threadIdx.x; e < E; e += blockDim.x) {
    int c = 0;
    for (int b = 0; b < B; ++b) c += hist[static_cast<int64_t>(b) * E + e];
    counts[e] = c;
  }
  __syncthreads();
  scan_block(hist, B, E, align, M, counts, ps, base, meta, tokens_per_expert);
}

// Rows [lo, hi) of dst (and dst_probs) set to zero by this block's threads, rows r = lo + first,
// lo + first + step, ...
template <typename vec_t>
__device__ void zero_rows(char* dst, int64_t dst_stride, int64_t row_vecs, char* dst_probs, int probs_bytes,
                          int64_t lo, int64_t hi, int64_t first, int64_t step) {
  const vec_t zero{};
  for (int64_t r = lo + first; r < hi; r += step) {
    vec_t* row = reinterpret_cast<vec_t*>(dst + r * dst_stride);
    for (int64_t i = threadIdx.x; i < row_vecs; i += blockDim.x) row[i] = zero;
    if (dst_probs != nullptr && threadIdx.x == 0) {
      for (int j = 0; j < probs_bytes; ++j) dst_probs[r * probs_bytes + j] = 0;
    }
  }
}

template <typename vec_t, typename id_t>
__global__ void permute_kernel(
    const char* __restrict__ src, int64_t src_stride, const id_t* __restrict__ ids, const int* __restrict__ base,
    const int* __restrict__ meta, const char* __restrict__ probs, int probs_bytes, char* __restrict__ dst,
    int64_t dst_stride, char* __restrict__ dst_probs, int64_t* __restrict__ row_id_map, int K, int E, int64_t row_vecs,
    int64_t M, int n_pad, int n_tail, int64_t chunk_tokens) {
  extern __shared__ int64_t rows[];  // [K]
  const int pid = blockIdx.x;
  if (pid < n_pad) {  // expert pid's padding rows [ps + count, ps[pid + 1])
    const int64_t lo = static_cast<int64_t>(meta[pid]) + meta[E + 1 + pid];
    const int64_t hi = min(static_cast<int64_t>(meta[pid + 1]), M);
    zero_rows<vec_t>(dst, dst_stride, row_vecs, dst_probs, probs_bytes, lo, hi, 0, 1);
    return;
  }
  if (pid < n_pad + n_tail) {  // rows past the last group, strided over the tail blocks
    const int64_t lo = min(static_cast<int64_t>(meta[E]), M);
    zero_rows<vec_t>(dst, dst_stride, row_vecs, dst_probs, probs_bytes, lo, M, pid - n_pad, n_tail);
    return;
  }
  const int64_t n = pid - n_pad - n_tail;
  const int64_t b = n / chunk_tokens;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t slot = n * K + k;
    const int64_t v = static_cast<int64_t>(ids[slot]);
    int64_t row = -1;
    if (v >= 0 && v < E) {
      row = static_cast<int64_t>(base[b * E + v]) + row_id_map[slot];  // row_id_map holds the rank
      if (row >= M) row = -1;
    }
    row_id_map[slot] = row;
    rows[k] = row;
    if (probs != nullptr && row >= 0) {
      for (int j = 0; j < probs_bytes; ++j) dst_probs[row * probs_bytes + j] = probs[slot * probs_bytes + j];
    }
  }
  __syncthreads();
  // kUnroll loads in flight per thread before the K stores of each
  constexpr int kUnroll = 4;
  const vec_t* in = reinterpret_cast<const vec_t*>(src + n * src_stride);
  for (int64_t i0 = threadIdx.x; i0 < row_vecs; i0 += static_cast<int64_t>(blockDim.x) * kUnroll) {
    vec_t x[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = i0 + static_cast<int64_t>(u) * blockDim.x;
      if (i < row_vecs) x[u] = in[i];
    }
    for (int k = 0; k < K; ++k) {
      const int64_t row = rows[k];
      if (row < 0) continue;
      vec_t* out = reinterpret_cast<vec_t*>(dst + row * dst_stride);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t i = i0 + static_cast<int64_t>(u) * blockDim.x;
        if (i < row_vecs) out[i] = x[u];
      }
    }
  }
}

template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Vec {
  scalar_t v[V];
};

template <typename scalar_t, int V>
__global__ void unpermute_kernel(const scalar_t* __restrict__ src, int64_t src_stride, const int64_t* __restrict__ rid,
                                 const float* __restrict__ probs, scalar_t* __restrict__ dst, int64_t dst_stride,
                                 int K, int64_t H) {
  extern __shared__ int64_t shared_rows[];  // rows [K] | weights [K] (float)
  float* weights = reinterpret_cast<float*>(shared_rows + K);
  const int64_t n = blockIdx.x;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    const int64_t row = rid[n * K + k];
    shared_rows[k] = row;
    weights[k] = probs == nullptr ? 1.f : (row >= 0 ? probs[n * K + k] : 0.f);
  }
  __syncthreads();
  using VecT = Vec<scalar_t, V>;
  for (int64_t i = threadIdx.x; i < H / V; i += blockDim.x) {
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    for (int k = 0; k < K; ++k) {
      const int64_t row = shared_rows[k];
      if (row < 0) continue;
      const VecT x = reinterpret_cast<const VecT*>(src + row * src_stride)[i];
      if (probs == nullptr) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += static_cast<float>(x.v[j]);
      } else {
        const float w = weights[k];
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] += static_cast<float>(x.v[j]) * w;
      }
    }
    VecT out;
#pragma unroll
    for (int j = 0; j < V; ++j) out.v[j] = static_cast<scalar_t>(acc[j]);
    reinterpret_cast<VecT*>(dst + n * dst_stride)[i] = out;
  }
}

__global__ void mark_used_kernel(const int64_t* __restrict__ rid, int64_t S, uint8_t* __restrict__ used) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s < S) {
    const int64_t row = rid[s];
    if (row >= 0) used[row] = 1;
  }
}

__device__ float block_sum(float value, float* warp_sums /* shared [32] */) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int d = 16; d > 0; d >>= 1) value += __shfl_down_sync(0xffffffffu, value, d);
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  float total = 0.f;
  if (threadIdx.x == 0) {
    for (int w = 0; w < nwarps; ++w) total += warp_sums[w];
  }
  __syncthreads();
  return total;  // valid in thread 0
}

// dx[rid[n, k]] = g[n] * p[n, k] (g[n] without probs); rows with used[r] == 0 are zero;
// dprobs[n, k] = <g[n], x[rid[n, k]]> (fp32) when x != nullptr.
template <typename scalar_t, int V>
__global__ void scatter_kernel(const scalar_t* __restrict__ g, int64_t g_stride, const int64_t* __restrict__ rid,
                               const float* __restrict__ probs, const uint8_t* __restrict__ used,
                               const scalar_t* __restrict__ x, int64_t x_stride, scalar_t* __restrict__ dx,
                               int64_t dx_stride, float* __restrict__ dprobs, int K, int64_t H, int64_t M,
                               int n_zero, int rows_per_zero_block) {
  using VecT = Vec<scalar_t, V>;
  const int pid = blockIdx.x;
  if (pid < n_zero) {
    const int64_t lo = static_cast<int64_t>(pid) * rows_per_zero_block, hi = min(lo + rows_per_zero_block, M);
    VecT zero;
#pragma unroll
    for (int j = 0; j < V; ++j) zero.v[j] = static_cast<scalar_t>(0.f);
    for (int64_t r = lo; r < hi; ++r) {
      if (used[r]) continue;
      for (int64_t i = threadIdx.x; i < H / V; i += blockDim.x) reinterpret_cast<VecT*>(dx + r * dx_stride)[i] = zero;
    }
    return;
  }
  const int64_t n = pid - n_zero;
  __shared__ float warp_sums[32];
  const VecT* grow = reinterpret_cast<const VecT*>(g + n * g_stride);
  for (int k = 0; k < K; ++k) {
    const int64_t row = rid[n * K + k];
    if (row < 0) {
      if (dprobs != nullptr && threadIdx.x == 0) dprobs[n * K + k] = 0.f;
      continue;
    }
    const float w = probs == nullptr ? 1.f : probs[n * K + k];
    float dot = 0.f;
    for (int64_t i = threadIdx.x; i < H / V; i += blockDim.x) {
      const VecT gv = grow[i];
      VecT out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float gf = static_cast<float>(gv.v[j]);
        out.v[j] = static_cast<scalar_t>(probs == nullptr ? gf : gf * w);
      }
      reinterpret_cast<VecT*>(dx + row * dx_stride)[i] = out;
      if (x != nullptr) {
        const VecT xv = reinterpret_cast<const VecT*>(x + row * x_stride)[i];
#pragma unroll
        for (int j = 0; j < V; ++j) dot += static_cast<float>(xv.v[j]) * static_cast<float>(gv.v[j]);
      }
    }
    if (x != nullptr) {
      const float total = block_sum(dot, warp_sums);
      if (threadIdx.x == 0) dprobs[n * K + k] = total;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Largest vector width (bytes: 16, 8, 4, 2, 1) dividing the row size, both strides and both bases.
int vec_bytes(int64_t row_bytes, int64_t stride_a, int64_t stride_b, const void* a, const void* b) {
  for (int v : {16, 8, 4, 2}) {
    if (row_bytes % v == 0 && stride_a % v == 0 && stride_b % v == 0 && aligned(a, v) && aligned(b, v)) return v;
  }
  return 1;
}

int row_threads(int64_t row_vecs) {
  return static_cast<int>(std::min<int64_t>(128, std::max<int64_t>(32, cdiv(row_vecs, 32) * 32)));
}

void check_cuda(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
}

at::Tensor float_probs(const std::optional<at::Tensor>& probs) {
  if (!probs.has_value()) return at::Tensor();
  const at::Tensor& p = *probs;
  return (p.scalar_type() == at::kFloat ? p : p.to(at::kFloat)).contiguous();
}

template <typename id_t>
void launch_sort(const at::Tensor& ids, int64_t S, int64_t E, int64_t chunk_slots, int64_t B, int64_t align, int64_t M,
                 at::Tensor& work, at::Tensor& row_id_map, at::Tensor& tokens_per_expert, cudaStream_t stream) {
  int* base = work.data_ptr<int>();
  int* meta = base + B * E;
  int* hist = meta + 2 * (E + 1);
  const bool one_chunk = B == 1;
  const size_t smem = sizeof(int) * (E + (one_chunk ? E + 1 : 0));
  rank_kernel<id_t><<<B, kRankThreads, smem, stream>>>(
      ids.data_ptr<id_t>(), S, static_cast<int>(E), chunk_slots, hist, row_id_map.data_ptr<int64_t>(),
      static_cast<int>(align), M, base, meta, tokens_per_expert.data_ptr<int64_t>(), one_chunk);
  CUDA_LAUNCH_CHECK();
  if (!one_chunk) {
    scan_kernel<<<1, kScanThreads, sizeof(int) * (2 * E + 1), stream>>>(
        hist, static_cast<int>(B), static_cast<int>(E), static_cast<int>(align), M, base, meta,
        tokens_per_expert.data_ptr<int64_t>());
    CUDA_LAUNCH_CHECK();
  }
}

template <typename vec_t, typename id_t>
void launch_permute_copy(const at::Tensor& tokens, const at::Tensor& ids, const int* base, const int* meta,
                         const at::Tensor& probs, at::Tensor& permuted, at::Tensor& permuted_probs, at::Tensor& row_id_map,
                         int64_t K, int64_t E, int64_t M, int n_pad, int n_tail, int64_t chunk_tokens, cudaStream_t stream) {
  const int64_t N = tokens.size(0);
  const int64_t row_bytes = tokens.size(1) * tokens.element_size();
  const int64_t row_vecs = row_bytes / static_cast<int64_t>(sizeof(vec_t));
  const int64_t grid = n_pad + n_tail + N;
  if (grid == 0) return;
  const int probs_bytes = probs.defined() ? static_cast<int>(probs.element_size()) : 0;
  permute_kernel<vec_t, id_t><<<grid, row_threads(row_vecs), sizeof(int64_t) * std::max<int64_t>(K, 1), stream>>>(
      static_cast<const char*>(tokens.data_ptr()), tokens.stride(0) * tokens.element_size(), ids.data_ptr<id_t>(), base,
      meta, probs.defined() ? static_cast<const char*>(probs.data_ptr()) : nullptr, probs_bytes,
      static_cast<char*>(permuted.data_ptr()), permuted.stride(0) * permuted.element_size(),
      permuted_probs.defined() ? static_cast<char*>(permuted_probs.data_ptr()) : nullptr,
      row_id_map.data_ptr<int64_t>(), static_cast<int>(K), static_cast<int>(E), row_vecs, M, n_pad, n_tail, chunk_tokens);
  CUDA_LAUNCH_CHECK();
}

template <typename id_t>
void dispatch_permute_copy(int vec, const at::Tensor& tokens, const at::Tensor& ids, const int* base, const int* meta,
                           const at::Tensor& probs, at::Tensor& permuted, at::Tensor& permuted_probs,
                           at::Tensor& row_id_map, int64_t K, int64_t E, int64_t M, int n_pad, int n_tail,
                           int64_t chunk_tokens, cudaStream_t stream) {
#define MOE_COPY(T) launch_permute_copy<T, id_t>(tokens, ids, base, meta, probs, permuted, permuted_probs, row_id_map, \
                                                 K, E, M, n_pad, n_tail, chunk_tokens, stream)
  switch (vec) {
    case 16: MOE_COPY(uint4); break;
    case 8: MOE_COPY(uint2); break;
    case 4: MOE_COPY(uint32_t); break;
    case 2: MOE_COPY(uint16_t); break;
    default: MOE_COPY(uint8_t); break;
  }
#undef MOE_COPY
}

// (permuted [M, H], permuted_probs [M] or undefined, row_id_map int64 [N, K], tokens_per_expert int64 [E],
//  meta int32 [2, E + 1]). num_out_rows < 0: exactly the rows needed (one host sync).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> permute(
    at::Tensor tokens, at::Tensor selected_experts, int64_t num_experts, std::optional<at::Tensor> probs,
    int64_t align_size, int64_t num_out_rows) {
  check_cuda(tokens, "tokens");
  const c10::cuda::CUDAGuard guard(tokens.device());
  TORCH_CHECK(tokens.dim() == 2 && selected_experts.dim() == 2, "tokens [N, H] and selected_experts [N, K]");
  TORCH_CHECK(num_experts >= 1 && num_experts <= kMaxExperts, "the cuda permute backend takes 1 <= num_experts <= ",
              kMaxExperts, ", got ", num_experts);
  const int64_t N = tokens.size(0), H = tokens.size(1), K = selected_experts.size(1), E = num_experts;
  const int64_t S = N * K;
  TORCH_CHECK(K <= kMaxTopk, "the cuda permute backend takes top-k <= ", kMaxTopk, ", got ", K);
  TORCH_CHECK(S + E * (align_size - 1) < (int64_t{1} << 31), "the cuda permute backend needs N*K + E*(align_size-1) < 2**31");
  if (H > 0 && tokens.stride(1) != 1) tokens = tokens.contiguous();
  at::Tensor ids = selected_experts;
  if (ids.scalar_type() != at::kInt && ids.scalar_type() != at::kLong) ids = ids.to(at::kLong);
  ids = ids.contiguous();
  at::Tensor p;
  if (probs.has_value()) p = probs->contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  const auto i32 = tokens.options().dtype(at::kInt), i64 = tokens.options().dtype(at::kLong);

  // chunks: one round of 1024 slots where possible, at most kMaxChunks chunks
  int64_t chunk_tokens = std::max<int64_t>(1, kRankThreads / std::max<int64_t>(K, 1));
  chunk_tokens = std::max(chunk_tokens, cdiv(std::max<int64_t>(N, 1), kMaxChunks));
  const int64_t B = std::max<int64_t>(1, cdiv(N, chunk_tokens));
  const bool exact = num_out_rows < 0;
  const int64_t M = exact ? S + (align_size > 1 ? E * (align_size - 1) : 0) : num_out_rows;

  at::Tensor work = at::empty({2 * B * E + 2 * (E + 1)}, i32);  // base [B, E] | meta [2, E + 1] | hist [B, E]
  at::Tensor row_id_map = at::empty({N, K}, i64);
  at::Tensor tokens_per_expert = at::empty({E}, i64);
  if (ids.scalar_type() == at::kInt) {
    launch_sort<int32_t>(ids, S, E, chunk_tokens * K, B, align_size, M, work, row_id_map, tokens_per_expert, stream);
  } else {
    launch_sort<int64_t>(ids, S, E, chunk_tokens * K, B, align_size, M, work, row_id_map, tokens_per_expert, stream);
  }
  const int* base = work.data_ptr<int>();
  const int* meta = base + B * E;

  at::Tensor permuted = at::empty({M, H}, tokens.options());
  at::Tensor permuted_probs = p.defined() ? at::empty({M}, p.options()) : at::Tensor();
  const int n_pad = align_size > 1 ? static_cast<int>(E) : 0;
  const int n_tail = exact ? 0 : static_cast<int>(std::min<int64_t>(M, kZeroTailBlocks));
  const int64_t row_bytes = H * tokens.element_size();
  const int vec = vec_bytes(row_bytes, tokens.stride(0) * tokens.element_size(), permuted.stride(0) * permuted.element_size(),
                            tokens.data_ptr(), permuted.data_ptr());
  if (ids.scalar_type() == at::kInt) {
    dispatch_permute_copy<int32_t>(vec, tokens, ids, base, meta, p, permuted, permuted_probs, row_id_map, K, E, M, n_pad,
                                   n_tail, chunk_tokens, stream);
  } else {
    dispatch_permute_copy<int64_t>(vec, tokens, ids, base, meta, p, permuted, permuted_probs, row_id_map, K, E, M, n_pad,
                                   n_tail, chunk_tokens, stream);
  }
  if (exact) {
    const int64_t rows = work.narrow(0, B * E + E, 1).item<int>();  // host sync: the size depends on the routing
    permuted = permuted.narrow(0, 0, rows);
    if (permuted_probs.defined()) permuted_probs = permuted_probs.narrow(0, 0, rows);
  }
  return {permuted, permuted_probs, row_id_map, tokens_per_expert};
}

int value_vec(const at::Tensor& t, int64_t H, std::initializer_list<std::pair<const void*, int64_t>> rows) {
  // elements per vector: 16 bytes when the row length, every row stride and every base allow it
  const int per16 = 16 / static_cast<int>(t.element_size());
  if (H % per16 != 0) return 1;
  for (const auto& r : rows) {
    if (!aligned(r.first, 16) || (r.second * t.element_size()) % 16 != 0) return 1;
  }
  return per16;
}

// out [N, H] = sum_k probs[n, k] * permuted[row_id_map[n, k]] (fp32), in permuted's dtype.
at::Tensor unpermute(at::Tensor permuted, at::Tensor row_id_map, std::optional<at::Tensor> merging_probs) {
  check_cuda(permuted, "permuted");
  const c10::cuda::CUDAGuard guard(permuted.device());
  const int64_t N = row_id_map.size(0), K = row_id_map.size(1), H = permuted.size(1);
  at::Tensor out = at::empty({N, H}, permuted.options());
  if (N == 0 || H == 0) return out.zero_();
  if (permuted.stride(1) != 1) permuted = permuted.contiguous();
  row_id_map = row_id_map.contiguous();
  const at::Tensor p = float_probs(merging_probs);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int vec = value_vec(permuted, H, {{permuted.data_ptr(), permuted.stride(0)}, {out.data_ptr(), out.stride(0)}});
  const size_t smem = (sizeof(int64_t) + sizeof(float)) * K;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, permuted.scalar_type(), "moe_unpermute", [&] {  // fp64: the Python side takes the reference
    const int64_t vecs = H / (vec == 1 ? 1 : vec);
    const int threads = row_threads(vecs);
    auto run = [&](auto v_tag) {
      constexpr int V = decltype(v_tag)::value;
      unpermute_kernel<scalar_t, V><<<N, threads, smem, stream>>>(
          permuted.data_ptr<scalar_t>(), permuted.stride(0), row_id_map.data_ptr<int64_t>(),
          p.defined() ? p.data_ptr<float>() : nullptr, out.data_ptr<scalar_t>(), out.stride(0), static_cast<int>(K), H);
      CUDA_LAUNCH_CHECK();
    };
    if (vec == 16 / static_cast<int>(sizeof(scalar_t))) {
      run(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
    } else {
      run(std::integral_constant<int, 1>{});
    }
  });
  return out;
}

// (dx [num_rows, H] in x's dtype (g's without x), zero on rows no slot maps to;
//  dprobs [N, K] in merging_probs' dtype when probs_grad, else undefined).
std::tuple<at::Tensor, at::Tensor> scatter_rows(at::Tensor g, std::optional<at::Tensor> permuted, int64_t num_rows,
                                                at::Tensor row_id_map, std::optional<at::Tensor> merging_probs,
                                                bool probs_grad) {
  check_cuda(g, "grad");
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t N = row_id_map.size(0), K = row_id_map.size(1), H = g.size(1);
  at::Tensor x;
  if (permuted.has_value() && probs_grad) x = *permuted;
  const auto out_dtype = permuted.has_value() ? permuted->scalar_type() : g.scalar_type();
  if (g.scalar_type() != out_dtype) g = g.to(out_dtype);
  if (H > 0 && g.stride(1) != 1) g = g.contiguous();
  if (x.defined() && H > 0 && x.stride(1) != 1) x = x.contiguous();
  row_id_map = row_id_map.contiguous();
  const at::Tensor p = float_probs(merging_probs);
  at::Tensor dx = at::empty({num_rows, H}, g.options());
  at::Tensor dprobs32 = probs_grad ? at::empty({N, K}, g.options().dtype(at::kFloat)) : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor used = at::zeros({num_rows + 1}, g.options().dtype(at::kByte));
  if (N * K > 0) {
    mark_used_kernel<<<cdiv(N * K, 256), 256, 0, stream>>>(row_id_map.data_ptr<int64_t>(), N * K, used.data_ptr<uint8_t>());
    CUDA_LAUNCH_CHECK();
  }
  constexpr int kRowsPerZeroBlock = 16;
  const int n_zero = static_cast<int>(cdiv(num_rows, kRowsPerZeroBlock));
  const int64_t grid = n_zero + N;
  if (grid > 0 && H > 0) {
    const int vec = x.defined() ? value_vec(g, H, {{g.data_ptr(), g.stride(0)}, {dx.data_ptr(), dx.stride(0)},
                                                   {x.data_ptr(), x.stride(0)}})
                                : value_vec(g, H, {{g.data_ptr(), g.stride(0)}, {dx.data_ptr(), dx.stride(0)}});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "moe_scatter_rows", [&] {
      const int64_t vecs = H / (vec == 1 ? 1 : vec);
      const int threads = row_threads(vecs);
      auto run = [&](auto v_tag) {
        constexpr int V = decltype(v_tag)::value;
        scatter_kernel<scalar_t, V><<<grid, threads, 0, stream>>>(
            g.data_ptr<scalar_t>(), g.stride(0), row_id_map.data_ptr<int64_t>(), p.defined() ? p.data_ptr<float>() : nullptr,
            used.data_ptr<uint8_t>(), x.defined() ? x.data_ptr<scalar_t>() : nullptr, x.defined() ? x.stride(0) : 0,
            dx.data_ptr<scalar_t>(), dx.stride(0), probs_grad ? dprobs32.data_ptr<float>() : nullptr, static_cast<int>(K),
            H, num_rows, n_zero, kRowsPerZeroBlock);
        CUDA_LAUNCH_CHECK();
      };
      if (vec == 16 / static_cast<int>(sizeof(scalar_t))) {
        run(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
      } else {
        run(std::integral_constant<int, 1>{});
      }
    });
  } else if (probs_grad) {
    dprobs32.zero_();
  }
  at::Tensor dprobs;
  if (probs_grad) dprobs = merging_probs->scalar_type() == at::kFloat ? dprobs32 : dprobs32.to(merging_probs->scalar_type());
  return {dx, dprobs};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moe_dispatch CUDA kernels: permute / unpermute (see csrc/permute.cu)";
  m.def("permute", &permute, "counting-sort permute", py::arg("tokens"), py::arg("selected_experts"),
        py::arg("num_experts"), py::arg("probs"), py::arg("align_size"), py::arg("num_out_rows"));
  m.def("unpermute", &unpermute, "weighted gather-reduce", py::arg("permuted"), py::arg("row_id_map"),
        py::arg("merging_probs"));
  m.def("scatter_rows", &scatter_rows, "unpermute backward / permute along a row_id_map", py::arg("grad"),
        py::arg("permuted"), py::arg("num_rows"), py::arg("row_id_map"), py::arg("merging_probs"), py::arg("probs_grad"));
  m.attr("max_experts") = kMaxExperts;
}

// Allocation of the large buffers the CPU kernels write once and stream through (workspaces,
// gradients of every step, packed weights, outputs).
//
// torch's CPU allocator does not cache: a large at::empty is fresh mmap'd memory, and its
// first touch faults once per 4 KB page. On the reference machine (AMD EPYC, 2 cores) a
// 65 MB buffer (the LSTM training workspace at T=100, N=64, H=512) cost 26-31 ms to allocate
// and fill against 4 ms to refill, most of it in page faults; asking for 2 MB transparent huge
// pages before the first touch brought it to 6 ms, and a training forward went from 31k minor
// faults to 1.3k. End to end it did not pay there: LSTM training medians moved within the noise
// while its run-to-run spread grew from ~5% to 10-40% (a 2 MB page is zeroed at once, inside a
// step whose threads then wait for each other). So it is opt-in: GENFAST_HUGE_PAGES=1 makes
// empty_large ask (Linux madvise(MADV_HUGEPAGE), advice only: where THP is "never" nothing
// changes, where it is "always" the kernel does it anyway).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace genfast::cpu {

inline bool huge_pages_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("GENFAST_HUGE_PAGES");
    return value != nullptr && value[0] == '1';
  }();
  return enabled;
}

// Advises the 2 MB-aligned interior of [data, data + bytes) to use huge pages, if it holds at
// least one whole huge page.
inline void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(1) << 21;
  if (bytes < 2 * kHugePage || !huge_pages_enabled()) return;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(data);
  const uintptr_t first = (begin + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t last = (begin + bytes) & ~(kHugePage - 1);
  // Advice only: a failure (an old kernel, THP compiled out) leaves ordinary pages.
  if (last > first) (void)madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// at::empty, asking for huge pages when the buffer is large (>= 4 MB) and GENFAST_HUGE_PAGES=1.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor buffer = at::empty(sizes, options);
  if (buffer.device().is_cpu() && buffer.numel() > 0) advise_huge_pages(buffer.data_ptr(), buffer.nbytes());
  return buffer;
}

}  // namespace genfast::cpu

// Allocation of the large buffers the CPU kernels write once and stream through (workspaces,
// gradients of every step, packed weights, outputs).
//
// torch's CPU allocator does not cache: a buffer over glibc's mmap threshold (at most 32 MB) is
// fresh memory on every call, which the kernel maps and zeroes page by page on first touch, a large
// part of an RNN training step. So empty_cached draws training buffers of 1 MB and more from a cache
// of freed ones (BufferCache below: best fit within 2x, up to GENFAST_CPU_CACHE_MB, default 1024,
// held until genfast.empty_cache()).
//
// Transparent huge pages are opt-in for newly allocated blocks (GENFAST_HUGE_PAGES=1, Linux
// madvise(MADV_HUGEPAGE), advice only): they cut the page faults, but a 2 MB page is zeroed at
// once, inside a step whose threads then wait for each other, so step times vary more.
#pragma once

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>

#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>

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

// Freed large CPU buffers, kept for the next call of a kernel (see the top of this file).
class BufferCache {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;  // smaller buffers: glibc reuses them anyway

  static BufferCache& instance() {
    static BufferCache* cache = new BufferCache();  // never destroyed: tensors may outlive static destructors
    return *cache;
  }

  // A block of at least `bytes`: the smallest cached one up to twice that size, or a new one.
  void* take(size_t bytes, size_t* capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= 2 * bytes) {
        void* block = it->second;
        *capacity = it->first;
        cached_bytes_ -= it->first;
        free_.erase(it);
        return block;
      }
    }
    *capacity = (bytes + 63) / 64 * 64;
    void* block = std::aligned_alloc(64, *capacity);
    TORCH_CHECK(block != nullptr, "genfast: out of memory allocating a ", bytes, "-byte CPU buffer");
    advise_huge_pages(block, *capacity);
    return block;
  }

  // Keeps a block for reuse while the cache stays under its limit; frees it otherwise.
  void give_back(void* block, size_t capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (cached_bytes_ + capacity <= limit_bytes_) {
        free_.emplace(capacity, block);
        cached_bytes_ += capacity;
        return;
      }
    }
    std::free(block);
  }

  // Frees every cached block (genfast.empty_cache()); buffers in use are not affected.
  void clear() {
    std::multimap<size_t, void*> blocks;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      blocks.swap(free_);
      cached_bytes_ = 0;
    }
    for (auto& entry : blocks) std::free(entry.second);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }
  size_t limit_bytes() const { return limit_bytes_; }

 private:
  BufferCache() {
    const char* value = std::getenv("GENFAST_CPU_CACHE_MB");
    limit_bytes_ = (value != nullptr ? std::strtoull(value, nullptr, 10) : 1024) << 20;
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // capacity -> block
  size_t cached_bytes_ = 0;
  size_t limit_bytes_ = 0;
};

// at::empty, asking for huge pages when the buffer is large (>= 4 MB) and GENFAST_HUGE_PAGES=1.
inline at::Tensor empty_large(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor buffer = at::empty(sizes, options);
  if (buffer.device().is_cpu() && buffer.numel() > 0) advise_huge_pages(buffer.data_ptr(), buffer.nbytes());
  return buffer;
}

// at::empty for a large CPU buffer of training (the forward's workspace, backward's buffers and
// gradients), from BufferCache. Inference buffers stay on empty_large: a forward allocates far less,
// and reusing its output and packed-weight buffers did not pay. The storage stays resizable (a resize
// allocates through torch and hands the block back to the cache).
inline at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t size : sizes) numel *= size;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  BufferCache& cache = BufferCache::instance();
  if (!options.device().is_cpu() || bytes < BufferCache::kMinBytes || cache.limit_bytes() == 0)
    return empty_large(sizes, options);
  struct Block {
    void* data;
    size_t capacity;
  };
  auto* block = new Block{nullptr, 0};
  block->data = cache.take(bytes, &block->capacity);
  auto release = [](void* context) {
    auto* b = static_cast<Block*>(context);
    BufferCache::instance().give_back(b->data, b->capacity);
    delete b;
  };
  c10::Storage storage(c10::Storage::use_byte_size_t(), block->capacity,
                       c10::DataPtr(block->data, block, release, at::Device(at::kCPU)), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  return at::empty({0}, options).set_(storage, 0, sizes);
}

}  // namespace genfast::cpu

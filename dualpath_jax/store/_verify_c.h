/* C helpers of _verify.pyx.
   dp_xxh3: XXH3-64, the run-time dispatched x86 build (SSE2 / AVX2 / AVX-512, as python-xxhash uses) where
   setup.py compiles xxh_x86dispatch.c, else the portable inline build (NEON on aarch64).
   dp_copy_nt: copy with non-temporal stores where the CPU has them (x86: SSE2, part of x86-64). The
   destination (a PE/DE host buffer) is written once and next read by a device or NIC transfer, so its
   lines need not be read first (no read-for-ownership) nor kept in cache: about half the DRAM traffic of
   memcpy's cached stores for a copy out of the page cache. dp_copy_done orders the stores (sfence) before
   the caller may hand the buffer on. */
#ifndef DP_VERIFY_C_H
#define DP_VERIFY_C_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef DP_XXH_X86_DISPATCH
#include "_xxhash/xxh_x86dispatch.h"
#define dp_xxh3(p, n) XXH3_64bits_dispatch((p), (n))
#else
#define XXH_INLINE_ALL
#include "_xxhash/xxhash.h"
#define dp_xxh3(p, n) XXH3_64bits((p), (n))
#endif

#if defined(__SSE2__)
#include <emmintrin.h>
static inline void dp_copy_nt(uint8_t *d, const uint8_t *s, size_t n) {
    size_t head = (16 - ((uintptr_t)d & 15)) & 15; /* align the stores to 16 bytes */
    if (head > n) head = n;
    memcpy(d, s, head);
    size_t i = head;
    for (; i + 64 <= n; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(s + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(s + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(s + i + 32));
        __m128i e = _mm_loadu_si128((const __m128i *)(s + i + 48));
        _mm_stream_si128((__m128i *)(d + i), a);
        _mm_stream_si128((__m128i *)(d + i + 16), b);
        _mm_stream_si128((__m128i *)(d + i + 32), c);
        _mm_stream_si128((__m128i *)(d + i + 48), e);
    }
    memcpy(d + i, s + i, n - i);
}
static inline void dp_copy_done(void) { _mm_sfence(); }
#else
static inline void dp_copy_nt(uint8_t *d, const uint8_t *s, size_t n) { memcpy(d, s, n); }
static inline void dp_copy_done(void) {}
#endif
#endif

// Purpose-written races for the emulator's race checker (vk/port.h, "Race checker"): one small kernel,
// one case per hazard class, and a clean case that does the same exchanges with the barriers and
// cp.async waits in place. Block: 64 threads (2 warps); x: 512 floats; out[t]: what thread t read.
// tests/test_emulator_races.py finds the lines marked "// race:" below in the checker's reports.
#include "vk/kernels.h"
#include "vk/port.h"

namespace vk {

__global__ void selftest_race_kernel(const float* x, float* out, int which) {
  VK_DYNAMIC_SHARED(float, s);  // [512]
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
  const int other = (t + 32) % 64;  // the same lane of the other warp
  float r = 0.f;
  switch (static_cast<RaceCase>(which)) {
    case RaceCase::clean:
      if (warp == 0) st_shared(s + lane, x[lane]);
      __syncthreads();
      r = ld_shared(s + lane);
      __syncthreads();  // every read of s[0, 32) is done before the cp.async below overwrites it
      cp_async_16(s + 4 * t, x + 4 * t, true);
      cp_async_commit();
      cp_async_16(s + 256 + 4 * t, x + 256 + 4 * t, true);
      cp_async_commit();
      cp_async_wait<1>();  // the first group has landed
      __syncthreads();
      r += ld_shared(s + 4 * other);
      cp_async_wait<0>();
      __syncthreads();
      r += ld_shared(s + 256 + 4 * other);
      break;
    case RaceCase::read_after_write:                // warp 0 writes, warp 1 reads, no barrier
      if (warp == 0) st_shared(s + lane, x[lane]);  // race: raw write
      if (warp == 1) r = ld_shared(s + lane);       // race: raw read
      break;
    case RaceCase::write_after_read:  // warp 0 reads, warp 1 overwrites, no barrier
      if (warp == 0) st_shared(s + lane, x[lane]);
      __syncthreads();
      if (warp == 0) r = ld_shared(s + lane);            // race: war read
      if (warp == 1) st_shared(s + lane, x[32 + lane]);  // race: war write
      break;
    case RaceCase::write_after_write:  // both warps write the same words, no barrier
      st_shared(s + lane, x[t]);       // race: waw write
      __syncthreads();
      r = ld_shared(s + lane);
      break;
    case RaceCase::async_no_wait:               // no cp.async.wait_group before the barrier
      cp_async_16(s + 4 * t, x + 4 * t, true);  // race: async copy
      cp_async_commit();
      __syncthreads();
      r = ld_shared(s + 4 * other);  // race: async read
      cp_async_wait<0>();
      break;
    case RaceCase::async_wait_too_weak:  // wait_group 1 lands the first group only; the second is read
      cp_async_16(s + 4 * t, x + 4 * t, true);
      cp_async_commit();
      cp_async_16(s + 256 + 4 * t, x + 256 + 4 * t, true);  // race: weak copy
      cp_async_commit();
      cp_async_wait<1>();
      __syncthreads();
      r = ld_shared(s + 4 * other) + ld_shared(s + 256 + 4 * other);  // race: weak read
      cp_async_wait<0>();
      break;
    case RaceCase::warp_no_syncwarp:  // lanes of one warp exchange through shared memory without __syncwarp
      st_shared(s + t, x[t]);         // race: warp write
      r = ld_shared(s + (t ^ 1));     // race: warp read
      break;
    case RaceCase::warp_syncwarp:  // the same with __syncwarp: no hazard
      st_shared(s + t, x[t]);
      __syncwarp();
      r = ld_shared(s + (t ^ 1));
      break;
  }
  out[t] = r;
}

void selftest_race(const float* x, float* out, int which, stream_t stream) {
  VK_LAUNCH(selftest_race_kernel, 1, 64, 512 * sizeof(float), stream, x, out, which);
  check_launch("selftest_race");
}

}  // namespace vk

// Bindings of the emulator's self-tests: the selftests of vk/port.h (csrc/selftest/port_selftest.cu),
// the purpose-written races (csrc/selftest/race_selftest.cu) and, in the emulator build, the
// emulator's settings. Built into the same module as the op bindings (csrc/bindings/bind_ops.cpp).
#include "common.h"
#include "vk/kernels.h"

namespace vk_torch {
namespace {

// a: (16, 16) int16 bits, b: (8, 16) int16 bits (n, k), c: (16, 8) float32 -> d: (16, 8) float32
at::Tensor selftest_mma(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c, bool bf16) {
  check(a, "a", at::kShort);
  check(b, "b", at::kShort);
  check(c, "c", at::kFloat);
  TORCH_CHECK(a.numel() == 256 && b.numel() == 128 && c.numel() == 128, "selftest_mma: expected 16x16, 8x16, 16x8");
  DeviceGuard g(a);
  auto d = at::full({16, 8}, std::nan(""), c.options());
  vk::selftest_mma(bf16, ptr<uint16_t>(a), ptr<uint16_t>(b), ptr<float>(c), ptr<float>(d), stream_of(a));
  return d;
}

// src: (8 * count, 8) int16 -> (32, 4) int32 registers per lane
at::Tensor selftest_ldmatrix(const at::Tensor& src, int64_t count, bool trans) {
  check(src, "src", at::kShort);
  TORCH_CHECK(count == 1 || count == 2 || count == 4, "count: expected 1, 2 or 4, got ", count);
  TORCH_CHECK(src.numel() == 64 * count, "src: expected ", 64 * count, " elements");
  DeviceGuard g(src);
  auto out = at::zeros({32, 4}, src.options().dtype(at::kInt));
  vk::selftest_ldmatrix(ptr<uint16_t>(src), (int)count, trans, ptr<uint32_t>(out), stream_of(src));
  return out;
}

// x: (blocks, threads) float32 -> (blocks,) sums by a shared-memory tree
at::Tensor selftest_block_sum(const at::Tensor& x, bool barrier) {
  check(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 2, "x: expected (blocks, threads)");
  const int threads = (int)x.size(1);
  TORCH_CHECK(threads >= 1 && threads <= 1024 && (threads & (threads - 1)) == 0,
              "x: threads must be a power of two <= 1024");
  DeviceGuard g(x);
  auto out = at::full({x.size(0)}, std::nan(""), x.options());
  vk::selftest_block_sum(ptr<float>(x), ptr<float>(out), (int)x.size(0), threads, barrier, stream_of(x));
  return out;
}

// x: (warps * 32,) float32 -> (sums, ballots, anys, alls, total)
std::vector<at::Tensor> selftest_warp(const at::Tensor& x) {
  check(x, "x", at::kFloat);
  TORCH_CHECK(x.dim() == 1 && x.numel() % 32 == 0, "x: expected (warps * 32,)");
  const int warps = (int)(x.numel() / 32);
  DeviceGuard g(x);
  auto sums = at::full({warps}, std::nan(""), x.options());
  auto ballots = at::zeros({warps}, x.options().dtype(at::kInt));
  auto anys = at::full({warps}, -1, x.options().dtype(at::kInt));
  auto alls = at::full({warps}, -1, x.options().dtype(at::kInt));
  auto total = at::zeros({1}, x.options());
  vk::selftest_warp(ptr<float>(x), warps, ptr<float>(sums), ptr<uint32_t>(ballots), ptr<int>(anys), ptr<int>(alls),
                    ptr<float>(total), stream_of(x));
  return {sums, ballots, anys, alls, total};
}

// x: (512,) float32, which: a vk::RaceCase -> (64,) what each thread read
at::Tensor selftest_race(const at::Tensor& x, int64_t which) {
  check(x, "x", at::kFloat);
  TORCH_CHECK(x.numel() == 512, "x: expected 512 elements, got ", x.numel());
  TORCH_CHECK(which >= 0 && which <= (int64_t)vk::RaceCase::warp_syncwarp, "which: expected a case 0..",
              (int)vk::RaceCase::warp_syncwarp, ", got ", which);
  DeviceGuard g(x);
  auto out = at::full({64}, std::nan(""), x.options());
  vk::selftest_race(ptr<float>(x), ptr<float>(out), (int)which, stream_of(x));
  return out;
}

#ifdef VK_EMULATE
// The emulator's settings (vk/emulator.h): (schedule, seed, racecheck), read by every later launch.
pybind11::tuple emulator_settings() {
  const auto& s = vk::emu::settings();
  return pybind11::make_tuple(std::string(vk::emu::kScheduleNames[int(s.schedule)]), s.seed, s.racecheck);
}
void set_emulator_settings(const std::string& schedule, uint64_t seed, bool racecheck) {
  vk::emu::Settings s;
  try {
    s.schedule = vk::emu::parse_schedule(schedule);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
  s.seed = seed;
  s.racecheck = racecheck;
  vk::emu::settings() = s;
}
#endif

}  // namespace

void bind_selftests(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("selftest_mma", &selftest_mma, "one mma.m16n8k16 (a, b as 16-bit patterns)");
  m.def("selftest_ldmatrix", &selftest_ldmatrix, "ldmatrix x1/x2/x4 [.trans] of (8*count, 8) 16-bit values");
  m.def("selftest_block_sum", &selftest_block_sum, "shared-memory tree sum per block, with or without barriers");
  m.def("selftest_warp", &selftest_warp, "warp shuffles, votes and atomicAdd");
  m.def("selftest_race", &selftest_race, "purpose-written shared-memory races (vk::RaceCase) for the race checker",
        py::arg("x"), py::arg("which"));
#ifdef VK_EMULATE
  m.def("emulator_settings", &emulator_settings, "(schedule, seed, racecheck) of the emulator");
  m.def("set_emulator_settings", &set_emulator_settings, "set the emulator's schedule, seed and race checker",
        py::arg("schedule"), py::arg("seed"), py::arg("racecheck"));
#endif
}

}  // namespace vk_torch

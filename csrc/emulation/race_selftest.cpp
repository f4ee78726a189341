// Host-emulation build of csrc/selftest/race_selftest.cu.
#include "../selftest/race_selftest.cu"

// Host-emulation build of csrc/selftest/port_selftest.cu.
#include "../selftest/port_selftest.cu"

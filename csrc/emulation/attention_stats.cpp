// Host-emulation build of csrc/attention/stats.cu (the same source nvcc compiles for the GPU).
#include "../attention/stats.cu"

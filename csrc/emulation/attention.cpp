// Host-emulation build of csrc/attention/flash_fwd.cu (the same source nvcc compiles for the GPU).
#include "../attention/flash_fwd.cu"

// Host-emulation build of csrc/gemm/gemm.cu.
#include "../gemm/gemm.cu"

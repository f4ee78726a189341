// Host-emulation build of csrc/gemm/gemm_f16.cu.
#include "../gemm/gemm_f16.cu"

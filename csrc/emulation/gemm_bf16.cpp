// Host-emulation build of csrc/gemm/gemm_bf16.cu.
#include "../gemm/gemm_bf16.cu"

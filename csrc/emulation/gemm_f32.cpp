// Host-emulation build of csrc/gemm/gemm_f32.cu.
#include "../gemm/gemm_f32.cu"

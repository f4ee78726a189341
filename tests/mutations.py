"""Mutation testing: do the tests catch small realistic bugs in the kernels and the torch paths?

    python tests/mutations.py                 # every mutation, one at a time; prints a report and a score
    python tests/mutations.py --list          # the mutations (and checks that each pattern matches once)
    python tests/mutations.py --only NAME[,NAME...] [--jobs N] [--no-baseline] [--workdir DIR]

Each mutation replaces one exact piece of text (it must occur exactly once in its file) and names the
tests that should catch it, kept small so the whole run takes minutes. The run works on a copy of the
repository (the files git tracks plus untracked, not ignored ones), never on the checkout itself:
for each mutation the copy's file is mutated, the tests run there (pytest -x, its own JIT cache, so
CUDA mutations rebuild only the changed emulator translation units), and the file is restored
whatever happens. A mutation is *killed* when its tests fail (or time out), *survived* when they
pass. Before the mutations, each distinct test selection runs once unmutated (the baseline): a
selection that fails there makes the run stop, since it could not tell a mutation from a broken test.

`accepted` marks a survivor we keep on purpose, with the reason; it still counts as survived in the
score. Not part of the default test run (it is slow); run it after adding tests and put the score in
the README's testing section. Exit status: 0 when every mutation that is not accepted was killed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import filecmp
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    tests: Tuple[str, ...]  # pytest arguments (files, -k filters)
    accepted: Optional[str] = None  # why a survivor is acceptable (None: it must be killed)


# Test selections, one per area.
# tests/test_hard_inputs.py (numerically hard inputs) joins each selection for its backend and ops.
T_ATTN = (
    "tests/test_attention.py",
    "tests/test_hard_inputs.py",
    "-k",
    "(test_attention.py and triton) or (test_hard_inputs and triton and flash_attention)",
)
# sm_90's tensor-descriptor attention kernel (attention_tma), run in the interpreter as variant "triton_tma".
T_ATTN_TMA = (
    "tests/test_attention.py",
    "tests/test_hard_inputs.py",
    "-k",
    "(test_attention.py and tma) or (test_hard_inputs and triton_tma)",
)
T_GEMM = (
    "tests/test_gemm.py",
    "tests/test_hard_inputs.py",
    "-k",
    "(test_gemm and triton) or (test_hard_inputs and triton and (linear or mlp or patch))",
)
T_MLP = (
    "tests/test_mlp.py",
    "tests/test_hard_inputs.py",
    "-k",
    "(test_mlp.py and triton) or (test_hard_inputs and triton and (layernorm or mlp))",
)
T_PATCH = (
    "tests/test_patch_embed.py",
    "tests/test_hard_inputs.py",
    "-k",
    "(test_patch_embed.py and triton) or (test_hard_inputs and triton and patch)",
)
T_QKV = (
    "tests/test_qkv_attention.py",
    "tests/test_hard_inputs.py",
    "-k",
    "(test_qkv_attention.py and not cuda) or (test_hard_inputs and triton and qkv)",
)
T_CUDA_ATTN = (
    "tests/test_attention.py",
    "tests/test_qkv_attention.py",
    "tests/test_emulator_races.py",
    "tests/test_hard_inputs.py",
    "-k",
    "not compiles and (attention or Attention) and (not test_hard_inputs or cuda) and (not test_attention.py or cuda) "
    "and (not test_qkv_attention.py or cuda)",
)
T_CUDA_GEMM = (
    "tests/test_gemm.py",
    "tests/test_mlp.py",
    "tests/test_patch_embed.py",
    "tests/test_emulator_races.py",
    "tests/test_hard_inputs.py",
    "-k",
    "not compiles and (gemm or mlp or patch or linear or qkv or stats or layernorm) "
    "and (not test_hard_inputs or cuda) and (not test_gemm or cuda) and (not test_mlp.py or cuda) "
    "and (not test_patch_embed.py or cuda)",
)
T_BWD_ATTN = ("tests/test_backward.py", "-k", "(flash_attention or qkv_attention) and not full")
T_BWD_GEMM = ("tests/test_backward.py", "-k", "(linear or mlp) and not full")
T_BWD_PATCH = ("tests/test_backward.py", "-k", "patch and not full")
T_TORCH = (
    "tests/test_torch_paths.py",
    "tests/test_models.py",
    "tests/test_swap_timm.py",
    "tests/test_swap_hf.py",
    "-k",
    "torch or oracle",
)

MUTATIONS: List[Mutation] = [
    # ------------------------------------------------------------------ Triton: attention
    Mutation(
        "triton-attn-no-key-mask",
        "vit_kernels/triton/attention.py",
        '        s = tl.where(mask_n[None, :], s, float("-inf"))\n',
        "",
        T_ATTN,
    ),
    Mutation(
        "triton-attn-no-acc-rescale",
        "vit_kernels/triton/attention.py",
        "        acc = acc * alpha[:, None]\n",
        "",
        T_ATTN,
    ),
    # The split path passes the qkv buffer once with k and v as offsets into it: a kernel that drops
    # the offset reads q as k.
    Mutation(
        "triton-attn-k-offset-dropped",
        "vit_kernels/triton/attention.py",
        "    k_base = tl.multiple_of(k_ptr + k_off + b * stride_kb + h * stride_kh, 16)\n",
        "    k_base = tl.multiple_of(k_ptr + b * stride_kb + h * stride_kh, 16)\n",
        T_QKV,
    ),
    # A replayed TMA launch makes its tensor descriptors again on the call's tensors (not on another one).
    Mutation(
        "replay-descriptor-wrong-base",
        "vit_kernels/replay.py",
        "        lines.append(f\"    _d['base'] = p{base}\")\n",
        "        lines.append(\"    _d['base'] = p0\")\n",
        ("tests/test_tuning.py", "-k", "tma"),
    ),
    # The LayerNorm fold is made on every call: a fold of a weight kept per parameter object goes stale after
    # an in-place write (through .data, no version bump, or not).
    Mutation(
        "tma-fold-cached",
        "vit_kernels/triton/gemm_tma.py",
        "        ln = layernorm_prologue(x, eps, weight, bias, norm_weight, norm_bias, room=triton.cdiv(M, config.block_m))\n",
        "        ln = layernorm_prologue(x, eps, layernorm_prologue.__dict__.setdefault(id(weight), weight.clone()), bias, norm_weight, norm_bias, room=triton.cdiv(M, config.block_m))\n",
        ("tests/test_triton_gemm_tma.py", "tests/test_tuning.py", "-k", "writes_through_data or folded_tma"),
    ),
    # W' lives in the prologue's workspace: the GEMM reads it at its own offset there, and the launcher refuses
    # a weight that is not the fold's (the kernel would read the workspace whatever weight says).
    Mutation(
        "tma-fold-weight-offset-wrong",
        "vit_kernels/triton/gemm_tma.py",
        "        w_ptr = (stats_ptr + wf_off).to(w0_ptr.dtype, bitcast=True)\n",
        "        w_ptr = (stats_ptr + fold_off).to(w0_ptr.dtype, bitcast=True)\n",
        ("tests/test_triton_gemm_tma.py", "-k", "layernorm"),
    ),
    Mutation(
        "tma-fold-weight-unchecked",
        "vit_kernels/triton/gemm_tma.py",
        "            or weight is not fold.weight\n"
        "            or wf_off < affine_off + 2 * K\n"
        "            or wf_off % 64\n"
        "            or weight.untyped_storage().data_ptr() != stats.untyped_storage().data_ptr()\n"
        "            or not weight.is_contiguous()\n"
        "            or weight.dtype != w0.dtype\n",
        "",
        ("tests/test_triton_gemm_tma.py", "-k", "folds_own_weight"),
    ),
    # float16 rows of W * gamma past float16's range folded unscaled (inf in W'), or scaled and never
    # scaled back in the epilogue.
    Mutation(
        "tma-fold-never-scaled",
        "vit_kernels/triton/layernorm.py",
        "            has_beta, has_b, weight.dtype == torch.float16, FOLD_BLOCK_N, FOLD_BLOCK_K, BLOCK_R, BLOCK_D,\n",
        "            has_beta, has_b, False, FOLD_BLOCK_N, FOLD_BLOCK_K, BLOCK_R, BLOCK_D,\n",
        ("tests/test_triton_gemm_tma.py", "-k", "scales_rows"),
    ),
    Mutation(
        "tma-fold-unscale-dropped",
        "vit_kernels/triton/gemm_tma.py",
        "        acc = (acc - mean[:, None] * c[None, :]) * rstd[:, None] * u[None, :]\n",
        "        acc = (acc - mean[:, None] * c[None, :]) * rstd[:, None]\n",
        ("tests/test_triton_gemm_tma.py", "-k", "scales_rows"),
    ),
    # The fold's bias b + W @ beta taken from the rounded W * gamma.
    Mutation(
        "tma-fold-bias-from-folded-weight",
        "vit_kernels/triton/layernorm.py",
        "            bias += tl.sum(w.to(tl.float64) * be.to(tl.float64)[None, :], axis=1)\n",
        "            bias += tl.sum(wf.to(tl.float64) * be.to(tl.float64)[None, :], axis=1)\n",
        ("tests/test_triton_gemm_tma.py", "-k", "fold_kernel"),
    ),
    # Each row tile flags its LayerNorm route; a tile whose rows do not cancel flagged as cancelling.
    Mutation(
        "tma-route-flag-always-set",
        "vit_kernels/triton/gemm_tma.py",
        "            tl.store(stats_ptr + 2 * M + pid_m, cancel.to(tl.float32))\n",
        "            tl.store(stats_ptr + 2 * M + pid_m, 1.0)\n",
        ("tests/test_tuning.py", "-k", "folded_tma"),
    ),
    # The fold's dominance flags ignored by the GEMM: an outlier channel's outputs keep the fold.
    Mutation(
        "gemm-tma-fold-dominance-ignored",
        "vit_kernels/triton/gemm_tma.py",
        "        return tl.max(flag, axis=0) > 0\n",
        "        return tl.max(flag, axis=0) > 2\n",
        ("tests/test_triton_gemm_tma.py", "-k", "outlier_channel"),
    ),
    # The row statistics' mean summed in fp32 again: its error ~eps_fp32 * |first| shows in an outlier channel.
    Mutation(
        "row-stats-mean-fp32-sum",
        "vit_kernels/triton/layernorm.py",
        "    mean = (first + tl.sum(total, axis=1) / D).to(tl.float32)\n",
        "    mean = (first + tl.sum(total.to(tl.float32), axis=1) / D).to(tl.float32)\n",
        ("tests/test_triton_gemm_tma.py", "-k", "outlier_channel"),
    ),
    # The cancel test without z's scale (|mean| * rstd > tau alone): rows of variance far below a large eps keep
    # the fold with z ~ 0, where its cancellation is all the output (eps 1e-6 never shows it).
    Mutation(
        "tma-cancel-test-ignores-eps",
        "vit_kernels/triton/gemm_tma.py",
        "        z_rms = tl.sqrt(tl.maximum(1.0 - ln_eps * rstd * rstd, 0.0))\n",
        "        z_rms = 1.0\n",
        ("tests/test_triton_gemm_tma.py", "-k", "near_constant_rows_take"),
    ),
    # A module under a fused wrapper replaced, parametrized or given an instance forward after fuse: the
    # fused path would read its weight and ignore its forward.
    Mutation(
        "swap-structure-unchecked",
        "vit_kernels/swap/wrapper.py",
        "        why = self.structure_reason() or self.param_reason(x) or self.hook_reason()\n        if why:\n            return why\n",
        "        why = self.param_reason(x) or self.hook_reason()\n        if why:\n            return why\n",
        ("tests/test_swap_fallbacks.py", "-k", "changed_after_fuse"),
    ),
    # Inside a torch.func transform an op with inputs requiring grad took the eager autograd path (its checks
    # read data pointers torch.func's tensors do not have).
    Mutation(
        "library-torch-func-as-eager-autograd",
        "vit_kernels/library.py",
        "        if not compiling and transform() is not None:\n            return _under_transform(op, args)\n",
        "",
        ("tests/test_library.py", "-k", "torch_func"),
    ),
    # torch.compile of a fused model under autograd asked the eager torch.func check while dynamo traced (never
    # None there): every op of an explicit kernel backend went to _under_transform, a graph break, a TypeError.
    Mutation(
        "library-compile-autograd-asks-transform",
        "vit_kernels/library.py",
        "        if not compiling and transform() is not None:\n",
        "        if transform() is not None:\n",
        ("tests/test_compile.py", "-k", "autograd_without_breaks and triton"),
    ),
    # torch.func.jvp through an explicit kernel backend: the custom op's tangent is dropped.
    Mutation(
        "library-torch-func-jvp-allowed",
        "vit_kernels/library.py",
        "_DIFFERENTIATING = {torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp}\n",
        "_DIFFERENTIATING = {torch._C._functorch.TransformType.Grad}\n",
        ("tests/test_library.py", "-k", "torch_func"),
    ),
    # Forward-mode AD through an explicit kernel backend: the custom op returns the primal alone.
    Mutation(
        "library-forward-ad-tangent-dropped",
        "vit_kernels/library.py",
        "        if dual:  # the custom op would return the primal alone: the tangent dropped, silently\n",
        "        if False:\n",
        ("tests/test_library.py", "-k", "forward_ad"),
    ),
    # A Triton backward under create_graph=True: gradients without a graph, a second differentiation fails
    # far away (or gives None with allow_unused).
    Mutation(
        "autograd-double-backward-unchecked",
        "vit_kernels/autograd.py",
        "            if torch.is_grad_enabled():\n                raise RuntimeError(DOUBLE_BACKWARD_REFUSED.format(op=op))\n",
        "",
        ("tests/test_library.py", "-k", "double_backward"),
    ),
    # The same through the custom op itself (an FX graph or an exported program run eagerly).
    Mutation(
        "library-double-backward-unchecked",
        "vit_kernels/library.py",
        "        if torch.is_grad_enabled():  # create_graph=True: gradients without a graph would drop, silently\n"
        "            raise RuntimeError(autograd.DOUBLE_BACKWARD_REFUSED.format(op=op))\n",
        "",
        ("tests/test_library.py", "-k", "double_backward"),
    ),
    # Under torch.autocast the kernel backends compute at the autocast dtype (their tensors cast): through the
    # public function, through the custom op's Autocast kernel; backend torch, compiled, its path traced op by
    # op from that kernel (a custom op node runs with autocast off).
    Mutation(
        "library-autocast-ignored",
        "vit_kernels/library.py",
        "    if _any_autocast() and autocast_device(args[0], args[-2]) is not None:",
        "    if False and _any_autocast() and autocast_device(args[0], args[-2]) is not None:",
        ("tests/test_library.py", "-k", "autocast"),
    ),
    Mutation(
        "qkv-statistics-autocast-ignored",
        "vit_kernels/ops/qkv_attention.py",
        "    device_type = library.autocast_device(x, backend)\n",
        "    device_type = None\n",
        ("tests/test_library.py", "-k", "autocast_with_statistics"),
    ),
    Mutation(
        "library-autocast-kernel-uncast",
        "vit_kernels/library.py",
        "                return overload(*_autocast_args(op, args, device_type))\n",
        "                return overload(*args)\n",
        ("tests/test_library.py", "-k", "autocast"),
    ),
    Mutation(
        "library-autocast-kernel-torch-as-node",
        "vit_kernels/library.py",
        '            if args[-2] == "torch":  # (a new contiguous tensor, as the op\'s own implementation returns)\n',
        "            if False:\n",
        ("tests/test_library.py", "-k", "autocast"),
    ),
    # torch.compile with autograd: an explicit triton backend silently traced as the torch path, or
    # the forward-only cuda backend running the torch path instead of raising.
    Mutation(
        "compile-grad-triton-as-torch",
        "vit_kernels/library.py",
        '    if backend == "triton":\n        return getattr(torch.ops.vit_kernels, op)(*args)\n',
        '    if backend == "triton":\n        return TORCH_PATHS[op](*args)\n',
        ("tests/test_compile.py", "-k", "autograd_without_breaks and triton and reference"),
    ),
    Mutation(
        "compile-grad-forward-only-unrefused",
        "vit_kernels/library.py",
        '    if backend not in ("auto", "torch"):\n        raise RuntimeError(backends.forward_only_message(op, backend, ("triton",)))\n',
        "",
        ("tests/test_compile.py", "-k", "forward_only"),
    ),
    # The Triton backward of linear taking the grad as AOT autograd passes it (loss = out.sum(): stride 0)
    # instead of its dense copy.
    Mutation(
        "backward-grad-not-dense",
        "vit_kernels/autograd.py",
        "    g = dense(grad).reshape(-1, N)\n",
        "    g = grad.reshape(-1, N)\n",
        ("tests/test_library.py", "-k", "test_backward_custom_op and linear and not flops"),
    ),
    # The registered Triton backward reading a strided layer scale as the caller passed it (the forward read
    # the dispatch's contiguous copy): wrong input and weight gradients, silently, under torch.compile.
    Mutation(
        "backward-strided-layer-scale",
        "vit_kernels/library.py",
        '    "linear": (2, 4),\n}\n',
        '    "linear": (2,),\n}\n',
        ("tests/test_library.py", "-k", "strided_params and linear"),
    ),
    # The backward op returning the residual's gradient as grad itself (an output aliasing an input).
    Mutation(
        "backward-op-gradient-aliases-input",
        "vit_kernels/library.py",
        "    if any(t.untyped_storage().data_ptr() == ptr for t in inputs):\n",
        "    if False:\n",
        ("tests/test_library.py", "-k", "backward_custom_op"),
    ),
    # The backward kernels reading a strided, expanded or offset argument as if it were contiguous.
    Mutation(
        "autograd-dense-strided-as-is",
        "vit_kernels/autograd.py",
        "    if t.is_contiguous() and t.data_ptr() % 16 == 0:\n        return t\n",
        "    return t\n",
        ("tests/test_layouts.py", "-k", "layout_gradients"),
    ),
    # FlopCounterMode: the backward op's count of a GEMM ignoring which gradients are asked.
    Mutation(
        "backward-flops-needs-ignored",
        "vit_kernels/library.py",
        "    return _gemm_grads(fc2, any(needs[:5]), needs[5]) + _gemm_grads(fc1, any(needs[:3]), needs[3])\n",
        "    return 2 * (fc1 + fc2)\n",
        ("tests/test_library.py", "-k", "backward_custom_op_flops"),
    ),
    # The tanh GELU epilogue's exp capped (as it once was): -Inf for -Inf (eager: NaN), -1.8e-5 for -1e30.
    Mutation(
        "gelu-tanh-exp-capped",
        "vit_kernels/triton/gemm.py",
        "        acc = acc / (1.0 + tl.exp(-2.0 * u))\n",
        "        acc = acc / (1.0 + tl.exp(tl.minimum(-2.0 * u, 80.0)))\n",
        ("tests/test_hard_inputs.py", "-k", "gelu_epilogue"),
    ),
    # The gradient functions reading a strided layer_scale as contiguous (wrong dx, dweight, dbias).
    Mutation(
        "autograd-strided-params-unchecked",
        "vit_kernels/autograd.py",
        "    checks.unit_stride_params(bias=bias, layer_scale=layer_scale)  # before any launch (the kernels' reads)\n",
        "",
        ("tests/test_backward.py", "-k", "refuse_strided"),
    ),
    # A tensor subclass among the parameters (torchao's quantized weights): only the wrapper's own
    # parameters looked at, not those of the modules under it.
    Mutation(
        "swap-subclass-params-unchecked",
        "vit_kernels/swap/wrapper.py",
        "            params=[d for d in [self._parameters] + [m._parameters for m in mods] if d],\n",
        "            params=[self._parameters],\n",
        ("tests/test_swap_fallbacks.py", "-k", "subclass"),
    ),
    # torchvision's block traced by torch.fx skipped the fall-backs: the train-mode graph lost dropout.
    Mutation(
        "swap-torchvision-fx-fallbacks-skipped",
        "vit_kernels/swap/torchvision.py",
        "        why = why or self.original_reason(input)\n",
        "        why = why or (None if library.symbolic(input) else self.original_reason(input))\n",
        ("tests/test_compile.py", "-k", "train_graph"),
    ),
    # A method of the original reached through the wrapper (timm's set_input_size, Sequential.append) changes the
    # original's children: the wrapper keeps its own, the fused path ignores the change and the next sync undoes it.
    Mutation(
        "swap-original-method-children-not-taken",
        "vit_kernels/swap/wrapper.py",
        "            _take_state(self, o)\n",
        "            pass\n",
        ("tests/test_swap_dynamic_size.py", "tests/test_swap_vit_pytorch.py", "-k", "set_input_size or its_methods"),
    ),
    # A LayerNorm's weight set to None after fuse reached the fused ops, which read it as no LayerNorm.
    Mutation(
        "swap-layernorm-weight-none-unchecked",
        "vit_kernels/swap/wrapper.py",
        '            and all([m._parameters.get("weight") is not None for m in s.norms])\n',
        "",
        ("tests/test_swap_fallbacks.py", "-k", "set_to_none"),
    ),
    Mutation(
        "swap-gelu-approximate-at-fuse",
        "vit_kernels/swap/reasons.py",
        "    return act.approximate if isinstance(act, nn.GELU) else at_fuse\n",
        "    return at_fuse\n",
        ("tests/test_swap_fallbacks.py", "-k", "approximate"),
    ),
    # A fall-back traced by torch.compile: its lock cannot be traced (fullgraph raised Unsupported).
    Mutation(
        "swap-fallback-bookkeeping-traced",
        "vit_kernels/swap/wrapper.py",
        "        if torch.compiler.is_compiling():\n            return self.original_forward(*args, **kwargs)\n",
        "",
        ("tests/test_compile.py", "-k", "replaced"),
    ),
    # A whole fused HF model pickled by its fused layer class, which no module defines by name.
    Mutation(
        "swap-hf-pickled-by-fused-class",
        "vit_kernels/swap/hf.py",
        "        return (_new_fused, (base,), self.__getstate__())\n",
        "        return super().__reduce_ex__(protocol)\n",
        ("tests/test_swap_hf.py", "-k", "saved_and_loaded"),
    ),
    # Monte-Carlo dropout (an eval model whose dropout modules alone train): only the wrapper's mode read.
    Mutation(
        "swap-dropout-mode-of-the-wrapper-only",
        "vit_kernels/swap/wrapper.py",
        "        return (self.training or any([m.training for m in mods])) and any(p > 0 for _, p in self.dropouts())\n",
        "        return self.training and any(p > 0 for _, p in self.dropouts())\n",
        ("tests/test_swap_fallbacks.py", "-k", "monte_carlo"),
    ),
    Mutation(
        "swap-instance-forward-admitted",
        "vit_kernels/swap/reasons.py",
        '            if "forward" in sub.__dict__:\n',
        "            if False:\n",
        ("tests/test_swap_fallbacks.py", "-k", "changed_after_fuse"),
    ),
    # The tuner times a Triton candidate as its launch plan runs it (the replay), not its launcher.
    Mutation(
        "tuner-times-the-launcher",
        "vit_kernels/tuning.py",
        "        if isinstance(r, replay.Replay):\n",
        "        if False:\n",
        ("tests/test_tuning.py", "-k", "timer_times"),
    ),
    # Row statistics are one (2, M) buffer: the GEMM reading rstd where the means are.
    Mutation(
        "triton-gemm-rstd-at-mean",
        "vit_kernels/triton/gemm.py",
        "        rstd = tl.load(stats_ptr + M + offs_m, mask=m_mask, other=0.0)\n",
        "        rstd = tl.load(stats_ptr + offs_m, mask=m_mask, other=0.0)\n",
        T_MLP,
    ),
    Mutation(
        "triton-attn-sum-no-rescale",
        "vit_kernels/triton/attention.py",
        "        l_i = l_i * alpha + tl.sum(p, axis=1)\n",
        "        l_i = l_i + tl.sum(p, axis=1)\n",
        T_ATTN,
    ),
    # The running max only guards against overflow, so it takes scores that drop by more than ~128 (log2
    # domain) between key tiles to see it: survived the tests of 2026-11-25, killed since by the hard inputs.
    Mutation(
        "triton-attn-max-per-tile",
        "vit_kernels/triton/attention.py",
        "        m_new = tl.maximum(m_i, tl.max(s, axis=1))\n",
        "        m_new = tl.max(s, axis=1)\n",
        T_ATTN,
    ),
    # head_dim 72 / 80 run as 64 + 16: the second chunk's share of the scores and its rescale
    Mutation(
        "triton-attn-second-chunk-score-dropped",
        "vit_kernels/triton/attention.py",
        "            s = tl.dot(q1, tl.trans(k1), s, input_precision=INPUT_PRECISION)\n",
        "",
        T_ATTN,
    ),
    Mutation(
        "triton-attn-second-chunk-no-rescale",
        "vit_kernels/triton/attention.py",
        "            acc1 = acc1 * alpha[:, None]\n",
        "",
        T_ATTN,
    ),
    Mutation(
        "triton-attn-out-row-stride",
        "vit_kernels/triton/attention.py",
        "o_ptrs = o_base + tl.multiple_of(offs_m.to(tl.int64) * stride_on, 8)",
        "o_ptrs = o_base + tl.multiple_of(offs_m.to(tl.int64) * stride_qn, 8)",
        T_ATTN,
    ),
    # ------------------------------------------------------------------ Triton: attention on tensor descriptors
    Mutation(
        "triton-attn-tma-no-tail-mask",
        "vit_kernels/triton/attention_tma.py",
        '        s = tl.where((start_n + tl.arange(0, BLOCK_N) < NKV)[None, :], s, float("-inf"))\n',
        "        s = s * 1.0\n",  # (the line is an if's whole body)
        T_ATTN_TMA,
    ),
    Mutation(
        "triton-attn-tma-no-tail-tile",
        "vit_kernels/triton/attention_tma.py",
        "        for start_n in range(n_full, NKV, TAIL_N):  # the rest in TAIL_N-key tiles, masked\n",
        "        for start_n in range(n_full, n_full, TAIL_N):  # the rest in TAIL_N-key tiles, masked\n",
        T_ATTN_TMA,
    ),
    Mutation(
        "triton-attn-tma-second-chunk-column",
        "vit_kernels/triton/attention_tma.py",
        "        v1 = v1_desc.load([bv, h, start_n, BLOCK_D0]).reshape(BLOCK_N, BLOCK_D1)\n",
        "        v1 = v1_desc.load([bv, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D1)\n",
        T_ATTN_TMA,
    ),
    # q, k, v as the planes of one buffer (the split path): v read at k's images.
    Mutation(
        "triton-attn-tma-v-plane-as-k",
        "vit_kernels/triton/attention_tma.py",
        "    v = v_desc.load([bv, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D0)\n",
        "    v = v_desc.load([bk, h, start_n, 0]).reshape(BLOCK_N, BLOCK_D0)\n",
        T_ATTN_TMA,
    ),
    Mutation(
        "triton-attn-tma-lse-log2",
        "vit_kernels/triton/attention_tma.py",
        "        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453\n",
        "        lse = m_i + tl.math.log2(l_i)\n",
        T_ATTN_TMA,
    ),
    # the structure configs (issue 11): the rotated loop's p v one tile ahead; the head-major grid counting
    # the key tiles; the warp-specialized kernel's second q chunk read at column 0
    Mutation(
        "triton-attn-tma-overlap-pv-tile",
        "vit_kernels/triton/attention_tma.py",
        "                        start_n - BLOCK_N,\n",
        "                        start_n,\n",
        T_ATTN_TMA,
    ),
    Mutation(
        "triton-attn-tma-structure-softmax-no-running-max",  # the row max of this tile alone
        "vit_kernels/triton/attention_tma.py",
        "    m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale)\n",
        "    m_new = tl.max(s, axis=1) * qk_scale\n",
        ("tests/test_hard_inputs.py", "-k", "structure_configs"),
    ),
    Mutation(
        "triton-attn-order-tiles-of-keys",  # the pointer kernel's head-major grid counted in key tiles
        "vit_kernels/triton/attention.py",
        "    n_m = tl.cdiv(NQ, BLOCK_M)\n",
        "    n_m = tl.cdiv(NKV, BLOCK_M)\n",
        T_ATTN,
    ),
    Mutation(
        "triton-attn-bwd-dkdv-order-tiles-of-queries",  # the dK/dV kernel's grid counted in query tiles
        "vit_kernels/triton/attention_bwd.py",
        "    n_n = tl.cdiv(NKV, BLOCK_N)  # one grid axis",
        "    n_n = tl.cdiv(NQ, BLOCK_N)  # one grid axis",
        ("tests/test_backward.py", "-k", "attention or flash"),
    ),
    Mutation(
        "triton-attn-tma-order-tiles-of-keys",
        "vit_kernels/triton/attention_tma.py",
        "        n_m = tl.cdiv(NQ, BLOCK_M)\n",
        "        n_m = tl.cdiv(NKV, BLOCK_M)\n",
        T_ATTN_TMA,
    ),
    Mutation(
        "triton-attn-tma-ws-second-chunk-column",
        "vit_kernels/triton/attention_tma.py",
        "        q1 = q1_desc.load([off_m, BLOCK_D0])\n",
        "        q1 = q1_desc.load([off_m, 0])\n",
        T_ATTN_TMA,
    ),
    # ------------------------------------------------------------------ Triton: GEMM, LayerNorm
    Mutation(
        "triton-gemm-k-mask-off-by-one",
        "vit_kernels/triton/gemm.py",
        "        k_mask = ks < K\n",
        "        k_mask = ks <= K\n",
        T_GEMM,
    ),
    Mutation(
        "triton-gemm-drop-residual",
        "vit_kernels/triton/gemm.py",
        "        acc += res.to(tl.float32)\n",
        "        acc += 0.0 * res.to(tl.float32)\n",
        T_GEMM,
    ),
    Mutation(
        "triton-gemm-drop-layer-scale",
        "vit_kernels/triton/gemm.py",
        "        acc *= tl.load(ls_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]\n",
        "        acc *= 1.0\n",
        T_GEMM,
    ),
    Mutation(
        "triton-gemm-gelu-tanh-coefficient",
        "vit_kernels/triton/gemm.py",
        "(acc + 0.044715 * acc * acc * acc)",
        "(acc + 0.04715 * acc * acc * acc)",
        T_MLP,
    ),
    Mutation(
        "triton-gemm-q-scale-on-k",
        "vit_kernels/triton/gemm.py",
        "tl.where(which == 0, q_scale, 1.0)",
        "tl.where(which <= 1, q_scale, 1.0)",
        T_GEMM,
    ),
    Mutation(
        "triton-gemm-drop-ln-bias",
        "vit_kernels/triton/gemm.py",
        "                if NORM == NORM_AFFINE:\n                    xn += tl.load(norm_bias_ptr",
        "                if NORM == NORM_PIXELS:\n                    xn += tl.load(norm_bias_ptr",  # never, here
        T_MLP,
    ),
    Mutation(
        "triton-gemm-cls-gets-bias",
        "vit_kernels/triton/gemm.py",
        "acc = tl.where((t < PREFIX)[:, None], cls[None, :], acc)",
        "acc = tl.where((t < PREFIX)[:, None], cls[None, :] + acc, acc)",
        T_PATCH,
    ),
    Mutation(
        "triton-gemm-uint8-mean-not-subtracted",
        "vit_kernels/triton/gemm.py",
        "xn = a.to(tl.float32) * g[None, :] + tl.load(norm_bias_ptr + ks, mask=k_mask, other=0.0)[None, :]",
        "xn = a.to(tl.float32) * g[None, :]",
        ("tests/test_patch_embed_uint8.py",),
    ),
    Mutation(
        "triton-patch-uint8-std-not-255",
        "vit_kernels/triton/patch_embed.py",
        "scale = (1.0 / (255.0 * image_std)).repeat_interleave(p * p)",
        "scale = (1.0 / (256.0 * image_std)).repeat_interleave(p * p)",
        ("tests/test_patch_embed_uint8.py",),
    ),
    Mutation(
        "cuda-gemm-uint8-vec-shift-dropped",
        "csrc/gemm/gemm.cuh",
        "        for (int e = 0; e < L::kChunk; ++e) v[e] = float(px8[e]) * scale + shift;\n",
        "        for (int e = 0; e < L::kChunk; ++e) v[e] = float(px8[e]) * scale;\n",
        ("tests/test_patch_embed_uint8.py", "-k", "cuda"),
    ),
    Mutation(
        "cuda-gemm-uint8-gather-channel-0",
        "csrc/gemm/gemm.cuh",
        "            v[e] = float(x) * p.pixel_scale[ch] + p.pixel_shift[ch];\n",
        "            v[e] = float(x) * p.pixel_scale[0] + p.pixel_shift[0];\n",
        ("tests/test_patch_embed_uint8.py", "-k", "cuda"),
    ),
    # Survived the tests of 2026-11-25 (eps 1e-6 hides it); killed since by the large-eps tests.
    Mutation(
        "triton-ln-eps-outside-sqrt",
        "vit_kernels/triton/layernorm.py",
        "    rstd = 1.0 / tl.sqrt_rn(tl.where(rmask, var + eps, 1.0))\n",
        "    rstd = 1.0 / tl.sqrt_rn(tl.where(rmask, var, 1.0)) + eps\n",
        T_MLP,
    ),
    Mutation(
        "triton-ln-unmasked-variance",
        "vit_kernels/triton/layernorm.py",
        "        diff = tl.where(mask, x.to(tl.float32) - mean[:, None], 0.0)\n",
        "        diff = x.to(tl.float32) - mean[:, None]\n",
        T_MLP,
    ),
    # ------------------------------------------------------------------ Triton: single-kernel QKV + attention
    # Survived the tests of 2026-11-25; killed since by test_dominant_key_in_the_tail_tile.
    Mutation(
        "triton-qkv-ignores-tail-max",
        "vit_kernels/triton/qkv_attention.py",
        "            m = tl.maximum(m, tl.max(s_t, axis=1))\n",
        "",
        T_QKV,
    ),
    Mutation(
        "triton-qkv-tail-sum-dropped",
        "vit_kernels/triton/qkv_attention.py",
        "            l += tl.sum(p_t, axis=1)\n",
        "",
        T_QKV,
    ),
    # Survived the tests of 2026-11-25 (eps 1e-6 hides it); killed since by the large-eps tests.
    Mutation(
        "triton-qkv-ln-eps-outside-sqrt",
        "vit_kernels/triton/qkv_attention.py",
        "rstd = 1.0 / tl.sqrt(tl.where(row_mask, tl.sum(acc, axis=1) / DIM + eps, 1.0))",
        "rstd = 1.0 / tl.sqrt(tl.where(row_mask, tl.sum(acc, axis=1) / DIM, 1.0)) + eps",
        T_QKV,
    ),
    # ------------------------------------------------------------------ Triton: backward kernels
    # Images that need a gradient while the parameters are frozen (saliency on a frozen ViT): the
    # forward-only kernel would cut the result off the graph (no gradient, silently).
    Mutation(
        "patch-embed-images-grad-ignored",
        "vit_kernels/ops/patch_embed.py",
        "        if needs_grad((images, weight, bias, pos_embed, cls_token)):  # forward and backward kernels\n",
        "        if needs_grad((weight, bias, pos_embed, cls_token)):  # forward and backward kernels\n",
        ("tests/test_backward.py", "-k", "frozen"),
    ),
    Mutation(
        "triton-attn-bwd-dk-unscaled", "vit_kernels/triton/attention_bwd.py", "    dk = dk * scale\n", "", T_BWD_ATTN
    ),
    # delta = rowsum(P * dP) without the division by rowsum(P): the LSE's rounding then scales delta
    # (13-25x dq's bound in fp32 with scores ~300 apart).
    Mutation(
        "triton-attn-bwd-delta-unnormalized",
        "vit_kernels/triton/attention_bwd.py",
        "    delta = p_dp_sum / tl.where(mask_m, p_sum, 1.0)\n",
        "    delta = p_dp_sum\n",
        T_BWD_ATTN,
    ),
    # dK/dV skipping the keys a query gives no probability (an exact no-op for finite inputs: dS = P * (...)
    # is 0 there anyway): a NaN score row (NaN or Inf in q or k) has P NaN, "p > 0" is False, and dk drops
    # the NaN eager has in the whole head. Only the NaN/Inf test sees it (the rest of T_BWD_ATTN passes).
    Mutation(
        "triton-attn-bwd-dkdv-skips-zero-p",
        "vit_kernels/triton/attention_bwd.py",
        "        ds = p * (dp - delta[:, None])\n        dk = tl.dot(",
        "        ds = tl.where(p > 0.0, p * (dp - delta[:, None]), 0.0)\n        dk = tl.dot(",
        T_BWD_ATTN,
    ),
    Mutation(
        "triton-dgelu-erf-no-pdf-term",
        "vit_kernels/triton/gemm.py",
        " + pre * 0.3989422804014327 * tl.exp(-0.5 * pre * pre)",
        "",
        T_BWD_GEMM,
    ),
    Mutation(
        "triton-ln-bwd-no-mean-term",
        "vit_kernels/triton/layernorm_bwd.py",
        "dx = (dxhat - c2s[:, None] - xhat * c1s[:, None])",
        "dx = (dxhat - xhat * c1s[:, None])",
        T_BWD_GEMM,
    ),
    Mutation(
        "triton-colsum-layer-scale-dropped",
        "vit_kernels/triton/gemm_bwd.py",
        "            g = g * ls[None, :]\n",
        "            g = g * 1.0\n",
        T_BWD_GEMM,
    ),
    Mutation(
        "triton-patch-bwd-bias-counts-cls-row",
        "vit_kernels/autograd.py",
        "column_sums(g[:, prefix:], T - prefix, (T * dim, dim, 1), bias.dtype)",
        "column_sums(g, T, (T * dim, dim, 1), bias.dtype)",
        T_BWD_PATCH,
    ),
    # A graph holding the custom op under autograd with the forward-only backend: silently PyTorch's backward.
    Mutation(
        "library-graph-cuda-backward-silent",
        "vit_kernels/library.py",
        '        raise RuntimeError(backends.forward_only_message(op, requested, ("triton",)))\n',
        "        pass\n",
        ("tests/test_backward.py", "-k", "traced_graph"),
    ),
    # ------------------------------------------------------------------ CUDA: attention
    Mutation(
        "cuda-attn-no-barrier-before-k-overwrite",
        "csrc/attention/flash_fwd.cuh",
        "    __syncthreads();  // V_j landed for every thread; every warp is done reading K_j\n",
        "    // (mutation: no barrier)\n",
        T_CUDA_ATTN,
    ),
    Mutation(
        "cuda-attn-no-cp-async-wait-for-k",
        "csrc/attention/flash_fwd.cuh",
        "    vk::cp_async_wait<0>();\n    __syncthreads();  // K_j landed",
        "    __syncthreads();  // K_j landed",
        T_CUDA_ATTN,
    ),
    # Survived the tests of 2026-11-25, as its Triton twin; killed since by the score-range hard inputs.
    Mutation(
        "cuda-attn-max-reset-per-tile",
        "csrc/attention/flash_fwd.cuh",
        "    float mx[2] = {m_row[0], m_row[1]};\n",
        "    float mx[2] = {-INFINITY, -INFINITY};\n",
        T_CUDA_ATTN,
    ),
    Mutation(
        "cuda-attn-no-acc-rescale", "csrc/attention/flash_fwd.cuh", "      acc_o[nt][0] *= alpha[0];\n", "", T_CUDA_ATTN
    ),
    Mutation(
        "cuda-attn-tail-mask-off-by-one",
        "csrc/attention/flash_fwd.cuh",
        "(i & 1) >= kv_n) x = -INFINITY;",
        "(i & 1) > kv_n) x = -INFINITY;",
        T_CUDA_ATTN,
    ),
    # ------------------------------------------------------------------ CUDA: GEMM, row statistics
    Mutation(
        "cuda-gemm-cp-async-wait-too-weak",
        "csrc/gemm/gemm.cuh",
        "    cp_async_wait<C::kStages - 2>();\n",
        "    cp_async_wait<C::kStages - 1>();\n",
        T_CUDA_GEMM,
    ),
    Mutation(
        "cuda-gemm-no-stage-barrier",
        "csrc/gemm/gemm.cuh",
        "    __syncthreads();  // stage kt is complete for everyone; stage kt-1 is free again\n",
        "    // (mutation: no barrier)\n",
        T_CUDA_GEMM,
    ),
    Mutation(
        "cuda-gemm-residual-before-layer-scale",
        "csrc/gemm/gemm.cuh",
        "    if (p.layer_scale) v *= to_float(static_cast<const T*>(p.layer_scale)[col]);\n"
        "    if (p.residual) v += to_float(static_cast<const T*>(p.residual)[int64_t(row) * p.ldr + col]);\n",
        "    if (p.residual) v += to_float(static_cast<const T*>(p.residual)[int64_t(row) * p.ldr + col]);\n"
        "    if (p.layer_scale) v *= to_float(static_cast<const T*>(p.layer_scale)[col]);\n",
        T_CUDA_GEMM,
    ),
    Mutation(
        "cuda-gemm-drop-bias",
        "csrc/gemm/gemm.cuh",
        "  if (p.bias) v += to_float",
        "  if (false) v += to_float",
        T_CUDA_GEMM,
    ),
    Mutation(
        "cuda-gemm-q-scale-on-k",
        "csrc/gemm/gemm.cuh",
        "    if (which == 0) v *= p.q_scale;\n",
        "    if (which != 2) v *= p.q_scale;\n",
        T_CUDA_GEMM,
    ),
    Mutation(
        "cuda-gemm-ln-bias-before-weight",
        "csrc/gemm/gemm.cuh",
        "          if (lw) y *= to_float(lw[k + e]);\n          if (lb) y += to_float(lb[k + e]);\n",
        "          if (lb) y += to_float(lb[k + e]);\n          if (lw) y *= to_float(lw[k + e]);\n",
        T_CUDA_GEMM,
    ),
    # Survived or died by the seed with eps 1e-6 (2026-11-25); the large-eps hard inputs (cuda) kill it.
    Mutation(
        "cuda-rowstats-eps-outside-sqrt",
        "csrc/layernorm/row_stats.cu",
        "    rstd[row] = rsqrtf(var + eps);\n",
        "    rstd[row] = rsqrtf(var) + eps;\n",
        T_CUDA_GEMM,
    ),
    Mutation(
        "cuda-rowstats-uncentred-variance",
        "csrc/layernorm/row_stats.cu",
        "    const float d = to_float(r[k]) - mu;\n",
        "    const float d = to_float(r[k]);\n",
        T_CUDA_GEMM,
    ),
    # The mean's sum of x - first in fp32 (as Triton's was): a small channel's x - first rounds to -first when
    # first is huge, and the mean of such a row (~1e-5) comes out 0.
    Mutation(
        "cuda-rowstats-mean-fp32-sum",
        "csrc/layernorm/row_stats.cu",
        "  double s = 0.0;\n  for (int k = lane; k < dim; k += 32) s += double(to_float(r[k])) - first;\n",
        "  float s = 0.f;\n  for (int k = lane; k < dim; k += 32) s += to_float(r[k]) - float(first);\n",
        ("tests/test_gemm.py", "-k", "huge_first and cuda"),
    ),
    # ------------------------------------------------------------------ torch paths
    Mutation(
        "torch-linear-drop-layer-scale",
        "vit_kernels/ops/linear.py",
        "        y = y * layer_scale\n",
        "        y = y\n",
        T_TORCH,
    ),
    Mutation(
        "torch-mlp-drop-layer-scale",
        "vit_kernels/ops/mlp.py",
        "        y = y * layer_scale\n",
        "        y = y\n",
        T_TORCH,
    ),
    Mutation(
        "torch-mlp-gelu-always-tanh",
        "vit_kernels/ops/mlp.py",
        "approximate=approximate)",
        'approximate="tanh")',
        T_TORCH,
    ),
    Mutation(
        "torch-mlp-hardcoded-eps",
        "vit_kernels/ops/mlp.py",
        "norm_weight, norm_bias, eps) if norm_weight",
        "norm_weight, norm_bias, 1e-5) if norm_weight",
        T_TORCH,
    ),
    Mutation(
        "torch-qkv-q-and-k-swapped",
        "vit_kernels/ops/qkv_attention.py",
        "    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)\n",
        "    k, q, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)\n",
        T_TORCH,
    ),
    Mutation(
        "torch-qkv-ignores-scale",
        "vit_kernels/ops/qkv_attention.py",
        "    o = sdpa(q, k, v, scale, sdpa_path)\n",
        "    o = sdpa(q, k, v, None, sdpa_path)\n",
        T_TORCH,
    ),
    Mutation(
        "torch-attention-ignores-scale",
        "vit_kernels/ops/flash_attention.py",
        "    if not path:\n        return F.scaled_dot_product_attention(q, k, v, scale=scale)\n",
        "    if not path:\n        return F.scaled_dot_product_attention(q, k, v)\n",
        T_TORCH,
    ),
    # ------------------------------------------------------------------ statistics path: as the plain call
    Mutation(
        "stats-qkv-params-not-copied",
        "vit_kernels/ops/qkv_attention.py",
        "        x, qkv_weight, qkv_bias, norm_weight, norm_bias = fused  # 1-D parameters as the kernels read them\n",
        "        x, qkv_weight, qkv_bias, norm_weight, norm_bias = tensors  # 1-D parameters as the kernels read them\n",
        ("tests/test_attention_stats.py", "-k", "every_layout and qkv_attention"),
    ),
    Mutation(
        "stats-flash-no-keys-launches",
        "vit_kernels/ops/flash_attention.py",
        '    if d.backend in ("triton", "cuda") and k.shape[2] == 0:\n',
        "    if False:\n",
        ("tests/test_attention_stats.py", "-k", "no_keys"),
    ),
    # A channels_last model's patch weight on the CUDA backend: refused on every call instead of copied.
    Mutation(
        "patch-embed-cuda-weight-not-copied",
        "vit_kernels/ops/patch_embed.py",
        '    w = {"weight": weight} if backend == "cuda" else {}\n',
        "    w = {}\n",
        ("tests/test_layouts.py", "-k", "patch_embed and weight and cuda"),
    ),
    # timm's dynamic-size patch embedding called without autocast's casts: fp32 under autocast.
    Mutation(
        "swap-timm-dynamic-embed-no-autocast",
        "vit_kernels/swap/timm.py",
        "        tokens = at_autocast(\n            ops.patch_embed, images,",
        "        tokens = (lambda f, *a, out_dtype=None, **k: f(*a, **k))(\n            ops.patch_embed, images,",
        ("tests/test_swap_autocast.py", "-k", "dynamic"),
    ),
    # ------------------------------------------------------------------ analysis
    # Registers in front of the patches taken for a class token (row 0 is register 0's attention).
    Mutation(
        "analysis-registers-as-class-token",
        "vit_kernels/analysis.py",
        "    if not geo.class_token or geo.prefix_tokens < 1:\n",
        "    if geo.prefix_tokens < 1:\n",
        ("tests/test_analysis.py", "-k", "no_class_token"),
    ),
    # The patch grid read from the images' width alone (a square grid for a non-square input).
    Mutation(
        "analysis-grid-from-width",
        "vit_kernels/analysis.py",
        "    geo = geo or geometry(model, images.shape[-2:])\n",
        "    geo = geo or geometry(model, images.shape[-1])\n",
        ("tests/test_analysis.py", "-k", "non_square"),
    ),
    # A module compiled in place (module.compile()) not seen as compiled: the misleading "not fused" error.
    Mutation(
        "analysis-module-compile-not-seen",
        "vit_kernels/analysis.py",
        'isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m',
        "isinstance(m, OptimizedModule) for m",
        ("tests/test_analysis.py", "-k", "compiled"),
    ),
    # geometry(model) of a non-square timm model (img_size=(32, 48)) from its height alone: a 4x4 grid for 4x6.
    Mutation(
        "analysis-model-size-from-height",
        "vit_kernels/analysis.py",
        "        return int(size[0]), int(size[1])\n",
        "        return int(size[0]), int(size[0])\n",
        ("tests/test_analysis_families.py", "-k", "non_square_32x48"),
    ),
    # DeiT's distillation token not counted as a prefix token: refused as a token-count mismatch / reshape error.
    Mutation(
        "analysis-deit-distillation-token-uncounted",
        "vit_kernels/analysis.py",
        "p, prefix, depth = cfg.patch_size, 1 + int(distill), cfg.num_hidden_layers",
        "p, prefix, depth = cfg.patch_size, 1, cfg.num_hidden_layers",
        ("tests/test_analysis_families.py", "-k", "hf_deit"),
    ),
    # vit-pytorch pool="mean" (no class token) reported as having one (class_token=True, 0 prefix tokens).
    Mutation(
        "analysis-vit-pytorch-mean-pool-class-token",
        "vit_kernels/analysis.py",
        "        depth, cls = len(model.transformer.layers), prefix > 0\n",
        "        depth = len(model.transformer.layers)\n",
        ("tests/test_analysis_families.py", "-k", "vit_pytorch_mean"),
    ),
    # Non-square patches taken at their height: a wrong grid, then token-count and reshape errors.
    Mutation(
        "analysis-non-square-patches-accepted",
        "vit_kernels/analysis.py",
        "        if p[0] != p[1]:  # the grid",
        "        if False:  # the grid",
        ("tests/test_analysis_families.py", "-k", "non_square_patches"),
    ),
    # The distance kernel's (batch * heads) programs writing in (heads, batch) order: samples and heads mixed.
    Mutation(
        "attention-stats-distance-batch-heads-order",
        "vit_kernels/triton/attention_stats.py",
        "    tl.store(dist_ptr + pid_bh.to(tl.int64) * NP + offs_m, acc, mask=mask_m)",
        "    tl.store(dist_ptr + (h * (tl.num_programs(0) // H) + b) * NP + offs_m, acc, mask=mask_m)",
        ("tests/test_analysis_families.py", "-k", "per_sample and triton"),
    ),
    # attention-distance's random images square at the first side of a non-square model's (height, width).
    Mutation(
        "attention-distance-random-images-square",
        "vit_kernels/commands/attention_distance.py",
        "*(side * geo.patch_size for side in geo.grid)",
        "geo.grid[0] * geo.patch_size, geo.grid[0] * geo.patch_size",
        ("tests/test_analysis_families.py", "-k", "commands"),
    ),
    # attention-map's panels square whatever the input's aspect (a 4x6 map stretched over a square picture).
    Mutation(
        "attention-map-square-panels",
        "vit_kernels/commands/attention_map.py",
        "resize((DISPLAY * w // max(h, w), DISPLAY * h // max(h, w)), Image.BICUBIC)",
        "resize((DISPLAY, DISPLAY), Image.BICUBIC)",
        ("tests/test_analysis_families.py", "-k", "commands"),
    ),
    # attention-map --out taken as given: a folder or a name Pillow cannot write found after the model ran.
    Mutation(
        "attention-map-out-unchecked",
        "vit_kernels/commands/arguments.py",
        '    if path.is_dir():\n        raise argparse.ArgumentTypeError(f"{expected}, got {text!r}, which is a folder")\n',
        "",
        ("tests/test_analysis.py", "-k", "bad_arguments"),
    ),
    # attention-map --rollout --heads all: the rollout drawn and --heads all ignored, exit 0.
    Mutation(
        "attention-map-rollout-ignores-heads",
        "vit_kernels/commands/attention_map.py",
        '    if args.rollout and args.heads == "all":\n',
        '    if args.rollout and args.heads == "every":\n',
        ("tests/test_analysis.py", "-k", "bad_arguments"),
    ),
    # attention-distance --images ... --batch-size N: the files run and --batch-size ignored, exit 0.
    Mutation(
        "attention-distance-batch-size-ignored-with-images",
        "vit_kernels/commands/attention_distance.py",
        "    if args.images and args.batch_size is not None:\n",
        "    if args.images and args.batch_size is None:\n",
        ("tests/test_analysis.py", "-k", "bad_arguments"),
    ),
    # ------------------------------------------------------------------ inspect
    # A --config that matches no label let inspect report a clean run of nothing (exit 0).
    Mutation(
        "inspect-empty-config-selection-passes",
        "vit_kernels/commands/inspect.py",
        "    if not configs:\n        labels",
        "    if False:\n        labels",
        ("tests/test_boundaries.py", "-k", "inspect"),
    ),
    # --arch given twice compiled (and listed) every configuration twice.
    Mutation(
        "inspect-duplicate-archs",
        "vit_kernels/commands/inspect.py",
        "    archs = sorted(set(archs))\n",
        "",
        ("tests/test_inspect.py", "-k", "twice"),
    ),
    # --jobs N started N worker processes for fewer configurations.
    Mutation(
        "inspect-jobs-above-configurations",
        "vit_kernels/commands/inspect.py",
        ".Pool(min(jobs, len(work)))",
        ".Pool(jobs)",
        ("tests/test_inspect.py", "-k", "jobs_start"),
    ),
    # ------------------------------------------------------------------ swap: checkpoints
    # The fused embeddings reading the original module's parameters: load_state_dict(assign=True) puts new
    # Parameters in the wrapper (the original gets them only when it runs or is restored).
    Mutation(
        "swap-hf-embeddings-read-original-params",
        "vit_kernels/swap/hf.py",
        "            cls_token=self.cls_token,\n",
        "            cls_token=self.original.cls_token,\n",
        ("tests/test_swap_hf.py", "-k", "round_trip"),
    ),
    # ------------------------------------------------------------------ swap: fall-backs, cached resampling
    Mutation(
        "swap-hooks-after-fuse-ignored",
        "vit_kernels/swap/wrapper.py",
        "        if not any(watch[2]):  # the per-call cost: one truth test per hook dict",
        "        if True:  # the per-call cost: one truth test per hook dict",
        ("tests/test_swap_fallbacks.py",),
    ),
    Mutation(
        "swap-hf-weights-not-handed-to-hooks",
        "vit_kernels/swap/hf.py",
        "            hook(p.self_attn, (x,), (h, stats.weights))",
        "            hook(p.self_attn, (x,), (h, None))",
        ("tests/test_swap_hf.py", "-k", "output_attentions"),
    ),
    # What is computed from parameters is made on every call: a copy kept per size (or per layer) misses
    # writes through .data (no version bump).
    Mutation(
        "swap-timm-pos-embed-kept",
        "vit_kernels/swap/timm.py",
        "        return self._embedding(root, grid)\n",
        "        return self.__dict__.setdefault(('kept', tuple(grid)), self._embedding(root, grid))\n",
        ("tests/test_swap_dynamic_size.py", "-k", "prefix_variants_resample or pos_embed_resampled"),
    ),
    Mutation(
        "swap-hf-pos-embed-kept",
        "vit_kernels/swap/hf.py",
        "        return self._sync_original().interpolate_pos_encoding(probe, H, W)  # every call, as transformers does\n",
        "        return self.__dict__.setdefault(('kept', H, W), self._sync_original().interpolate_pos_encoding(probe, H, W))\n",
        ("tests/test_swap_dynamic_size.py", "-k", "hf_pos_encoding"),
    ),
    # The configured size taken for transformers' shortcut: a non-square image_size is resampled by transformers.
    Mutation(
        "swap-hf-pos-embed-native-size-kept",
        "vit_kernels/swap/hf.py",
        "        if not interpolate or (H == W and (H // p) * (W // p) == pe.shape[1] - 1):\n",
        "        if not interpolate or (H, W) == tuple(self.image_size):\n",
        ("tests/test_swap_dynamic_size.py", "-k", "non_square"),
    ),
    Mutation(
        "swap-hf-qkv-concatenation-kept",
        "vit_kernels/swap/hf.py",
        "        return torch.cat((p.q.weight, p.k.weight, p.v.weight)), (torch.cat(bs) if bs[0] is not None else None)\n",
        "        return self.__dict__.setdefault('kept', (torch.cat((p.q.weight, p.k.weight, p.v.weight)), (torch.cat(bs) if bs[0] is not None else None)))\n",
        ("tests/test_swap_hf.py", "-k", "qkv_concatenation"),
    ),
    Mutation(
        "vit-pos-embed-kept",
        "vit_kernels/models/vit.py",
        "        return resample_pos_embed(self.pos_embed, grid, (self.grid, self.grid), prefix)\n",
        "        return self.__dict__.setdefault(('kept', grid), resample_pos_embed(self.pos_embed, grid, (self.grid, self.grid), prefix))\n",
        ("tests/test_models.py", "-k", "dynamic_img_size_resamples"),
    ),
    Mutation(
        "swap-timm-register-rows-lose-pos-embed",
        "vit_kernels/swap/timm.py",
        "        return pos[:, n:].clone(), None, prefix + pos[:, :n]",
        "        return pos[:, n:].clone(), None, prefix",
        ("tests/test_swap_dynamic_size.py", "-k", "prefix_variants and torch"),
    ),
    # attn.scale applied where timm's SDPA path (fused_attn, the default) ignores it.
    Mutation(
        "swap-timm-scale-on-sdpa-path",
        "vit_kernels/swap/timm.py",
        '                scale=None if getattr(a, "fused_attn", False) else a.scale,\n',
        "                scale=a.scale,\n",
        ("tests/test_swap_timm.py", "-k", "scale_set"),
    ),
    Mutation(
        "swap-timm-other-blocks-unreported",
        "vit_kernels/swap/timm.py",
        "    return out + _other_block_candidates(root, Block)\n",
        "    return out\n",
        ("tests/test_swap_timm.py", "tests/test_verify.py", "-k", "another_class or left_unfused"),
    ),
    Mutation(
        "swap-timm-stage-blocks-unreported",  # Swin's layers.N.blocks: only a blocks list beside patch_embed
        "vit_kernels/swap/timm.py",
        '            if sub.rpartition(".")[2] != "blocks" or not isinstance(blocks, (nn.Sequential, nn.ModuleList)):\n',
        '            if sub != join(path, "blocks") or not isinstance(blocks, (nn.Sequential, nn.ModuleList)):\n',
        ("tests/test_swap_timm.py", "-k", "hierarchical"),
    ),
    Mutation(
        "verify-all-blocks-left-passes",
        "vit_kernels/verify.py",
        "    elif not any(e.fused for e in blocks):\n",
        "    elif False:\n",
        ("tests/test_verify.py", "-k", "left_unfused"),
    ),
    # ------------------------------------------------------------------ tuning: the cache file
    # An entry of the cache file launched as written: a backend, path or config no candidate has.
    Mutation(
        "tuning-cache-candidate-unchecked",
        "vit_kernels/tuning.py",
        "            why = unknown_candidate(op, c)\n",
        "            why = None\n",
        ("tests/test_tuning.py", "-k", "malformed"),
    ),
    # A choice made on 16-byte aligned inputs reused for a view at an offset (the TMA GEMM refuses it).
    Mutation(
        "tuning-key-ignores-alignment",
        "vit_kernels/tuning.py",
        "(t.shape, t.stride(), t.dtype, t.data_ptr() & 15)",
        "(t.shape, t.stride(), t.dtype)",
        ("tests/test_tuning.py", "-k", "misaligned"),
    ),
    Mutation(
        "tuning-signature-ignores-alignment",
        "vit_kernels/tuning.py",
        '    return f"{cls} ptr%16={r}" if r else cls\n',
        "    return cls\n",
        ("tests/test_tuning.py", "-k", "misaligned"),
    ),
    # A cache folder that cannot be made or locked: the op call raises instead of one warning.
    Mutation(
        "tuning-cache-lock-error-raises",
        "vit_kernels/tuning.py",
        "        except OSError as e:  # filelock's Timeout too (a TimeoutError)\n",
        "        except ValueError as e:\n",
        ("tests/test_tuning.py", "-k", "unusable_cache"),
    ),
    Mutation(
        "cuda-build-folder-error-raises",
        "vit_kernels/cuda/build.py",
        "    except OSError as e:  # a regular file where a folder should be ($VIT_KERNELS_CACHE), a read-only folder\n",
        "    except ValueError as e:\n",
        ("tests/test_cuda_build.py", "-k", "unusable_build_folder"),
    ),
    # vk.tune again resets a part to auto that the user gave a backend after an earlier fallback.
    Mutation(
        "tune-resets-an-explicit-backend",
        "vit_kernels/tuning.py",
        '        if m.__dict__.pop("vk_tune_note", None) is not None and m.backend == "torch":',
        '        if m.__dict__.pop("vk_tune_note", None) is not None:',
        ("tests/test_tuning.py", "-k", "backend_set_after_a_fallback"),
    ),
    Mutation(
        "fuse-report-stale-fallback-note",
        "vit_kernels/swap/__init__.py",
        '        fallback = getattr(m, "vk_tune_note", None) if getattr(m, "backend", None) == "torch" else None',
        '        fallback = getattr(m, "vk_tune_note", None)',
        ("tests/test_tuning.py", "-k", "backend_set_after_a_fallback"),
    ),
    # A cached winner launched where its backend is not available (an error, or a disabled backend run).
    Mutation(
        "tuning-cached-winner-backend-unchecked",
        "vit_kernels/tuning.py",
        '        if b == "torch" or b in available((b,)):\n',
        "        if True:\n",
        ("tests/test_tuning.py", "-k", "cannot_run_here"),
    ),
    # A misspelled VIT_KERNELS_TUNE accepted by the calls that never read it (autograd).
    Mutation(
        "tuning-env-mode-unchecked-under-autograd",
        "vit_kernels/backends.py",
        "        tuning.current_mode()\n",
        "        pass\n",
        ("tests/test_tuning.py", "-k", "misspelled_env"),
    ),
    # A cached winner naming tiles this code does not offer, launched as written.
    Mutation(
        "tuning-cached-config-not-checked-offered",
        "vit_kernels/tuning.py",
        '        if w in self.candidate_list(op, f, [w.backend] if w.backend != "torch" else [], device_type):\n',
        "        if True:\n",
        ("tests/test_tuning.py", "-k", "does_not_offer"),
    ),
    # ------------------------------------------------------------------ tuning: the correctness check
    Mutation(
        "tuning-check-first-entries-only",
        "vit_kernels/tuning.py",
        "    return torch.cat([t.narrow(dim, 0, k), t.narrow(dim, n - k, k)], dim)",
        "    return t.narrow(dim, 0, 2 * k)",
        ("tests/test_tuning_check.py",),
    ),
    Mutation(
        "tuning-check-budget-ignored",
        "vit_kernels/tuning.py",
        "    if full <= budget:\n        return CheckPlan(op, n, 0, full, full, H, 0, hd)",
        "    if True:\n        return CheckPlan(op, n, 0, full, full, H, 0, hd)",
        ("tests/test_tuning_check.py",),
    ),
    Mutation(
        "tuning-check-heads-never-cut",
        "vit_kernels/tuning.py",
        "    if fixed + 8 * per * m <= budget or H <= 2:",
        "    if True:",
        ("tests/test_tuning_check.py",),
    ),
    # The check on the call's own inputs only: a candidate right on zeros / alike samples alone is kept.
    Mutation(
        "tuning-check-no-draw",
        "vit_kernels/tuning.py",
        "        if checked:  # the draw first",
        "        if False:  # the draw first",
        ("tests/test_tuning_check.py", "-k", "own_values"),
    ),
    # The draw runs, but a candidate that disagrees only there is kept.
    Mutation(
        "tuning-check-draw-verdict-ignored",
        "vit_kernels/tuning.py",
        "self._disagrees(c, out, oracle, baseline, plan) or wrong.get(c)",
        "self._disagrees(c, out, oracle, baseline, plan)",
        ("tests/test_tuning_check.py", "-k", "own_values"),
    ),
    Mutation(
        "tuning-oom-candidate-unreported",
        "vit_kernels/tuning.py",
        '        if not out_of_memory(e):\n            return f"failed:',
        '        if True:\n            return f"failed:',
        ("tests/test_tuning_check.py",),
    ),
    # ------------------------------------------------------------------ library: launch plans, device
    Mutation(
        "library-function-plans-unbounded",
        "vit_kernels/library.py",
        "        if len(store) >= (MAX_FUNCTION_PLANS if store is FUNCTION_PLANS else MAX_PLANS):",
        "        if len(store) >= MAX_PLANS and store is not FUNCTION_PLANS:",
        ("tests/test_launch_plans.py", "-k", "store"),
    ),
    # The quick test of a plan's signature (replay.matcher) must be as strict as the key on each part.
    Mutation(
        "matcher-alignment-unchecked",
        "vit_kernels/replay.py",
        "        tests.append(f\"not (({' | '.join(f'a{i}.data_ptr()' for i in aligned)}) & 15)\")",
        "        pass",
        ("tests/test_launch_plans.py", "-k", "quick or variant"),
    ),
    Mutation(
        "matcher-none-unchecked",
        "vit_kernels/replay.py",
        '    tests = [f"a{i} is None" for i, t in enumerate(tensors) if t is None]',
        "    tests = []",
        ("tests/test_launch_plans.py", "-k", "quick or variant"),
    ),
    Mutation(
        "matcher-sharing-unchecked",
        "vit_kernels/replay.py",
        '    tests += [f"a{i} is a{j}" for i, j in same]',
        "    pass",
        ("tests/test_launch_plans.py", "-k", "quick or variant or shared"),
    ),
    Mutation(
        "matcher-number-type-unchecked",
        "vit_kernels/replay.py",
        '        tests.append(f"a{i}.__class__ is _type{i} and a{i} == _value{i}")',
        '        tests.append(f"a{i} == _value{i}")',
        ("tests/test_launch_plans.py", "-k", "quick or variant"),
    ),
    Mutation(
        "matcher-nested-unrefused",
        "vit_kernels/replay.py",
        "    tests.append(f\"not ({' or '.join(f'a{i}.is_nested' for i in present)})\")",
        "    pass",
        ("tests/test_launch_plans.py", "-k", "memory_does_not"),
    ),
    Mutation(
        "checks-negative-view-unrefused",
        "vit_kernels/checks.py",
        "    if t.is_neg():",
        "    if False:",
        ("tests/test_launch_plans.py", "-k", "memory_does_not"),
    ),
    Mutation(
        "autograd-memory-unchecked",
        "vit_kernels/autograd.py",
        '                checks.in_memory(f"{name}[{i}]" if isinstance(t, tuple) else name, u)',
        "                pass",
        ("tests/test_backward.py", "-k", "memory_does_not"),
    ),
    Mutation(
        "recent-plan-tuner-state-ignored",
        "vit_kernels/library.py",
        "            if s == state and match(*args):",
        "            if match(*args):",
        ("tests/test_launch_plans.py", "-k", "tuning_mode"),
    ),
    Mutation(
        "library-device-guard-never",
        "vit_kernels/library.py",
        "        if x.get_device() != torch.cuda.current_device():",
        "        if False:",
        ("tests/test_library.py", "-k", "device_guard"),
    ),
]


# --------------------------------------------------------------------------------------------- the copy
def repo_files(root: Path) -> List[str]:
    """Files git tracks plus untracked, not ignored ones (relative paths); every file when no git."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"], capture_output=True, check=True
        ).stdout.decode()
        return [f for f in out.split("\0") if f and (root / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", ".venv", ".vkcache", "__pycache__", ".pytest_cache", "build", "dist"}
        return [
            str(p.relative_to(root))
            for p in root.rglob("*")
            if p.is_file() and not (set(p.relative_to(root).parts) & skip)
        ]


def sync_copy(root: Path, work: Path) -> None:
    """Make `work` hold the repository's files; copy only what differs (fresh mtimes, so ninja rebuilds)."""
    for rel in repo_files(root):
        src, dst = root / rel, work / rel
        if dst.is_file() and filecmp.cmp(src, dst, shallow=False):
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def run_tests(work: Path, tests: Sequence[str], timeout: float) -> Tuple[str, float, str]:
    """('pass' | 'fail' | 'timeout', seconds, the first failure line) of pytest -x in `work`."""
    env = dict(os.environ, PYTHONPATH=str(work), VIT_KERNELS_CACHE=str(work / ".vkcache"))
    cmd = [PYTHON, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--no-header", *tests]
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.perf_counter() - t0, f"timed out after {timeout:.0f} s"
    dt = time.perf_counter() - t0
    if p.returncode == 0:
        return "pass", dt, ""
    lines = (p.stdout + p.stderr).splitlines()
    first = next((ln for ln in lines if ln.startswith("FAILED") or ln.startswith("ERROR")), "")
    why = " / ".join(ln[1:].strip() for ln in [ln for ln in lines if ln.startswith("E ")][:3])
    first = first or f"pytest exited with status {p.returncode}"  # a collection error or a crash
    return "fail", dt, f"{first} | {why[:300]}" if why else first


def apply(work: Path, m: Mutation) -> str:
    """Mutate the copy's file; returns the original text."""
    path = work / m.path
    text = path.read_text()
    n = text.count(m.old)
    if n != 1:
        raise ValueError(f"{m.name}: the pattern occurs {n} times in {m.path} (expected exactly once)")
    path.write_text(text.replace(m.old, m.new, 1))
    return text


def check_patterns(root: Path, mutations: Sequence[Mutation]) -> List[str]:
    errors = []
    for m in mutations:
        p = root / m.path
        n = p.read_text().count(m.old) if p.is_file() else -1
        if n != 1:
            errors.append(f"{m.name}: pattern occurs {n} times in {m.path}" if n >= 0 else f"{m.name}: no {m.path}")
    return errors


# --------------------------------------------------------------------------------------------- main
def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--list", action="store_true", help="list the mutations and check their patterns")
    ap.add_argument("--only", default="", help="comma-separated mutation names (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="mutations tested at once, each in its own copy (default 1)")
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per test run (a timeout counts as killed)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    ap.add_argument("--workdir", default="", help="keep the copies here (reused: later runs rebuild less)")
    args = ap.parse_args(argv)

    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in {m.name for m in MUTATIONS}]
    if unknown:
        print(f"--only: unknown mutation(s) {', '.join(unknown)}; see --list", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"--jobs: expected an integer >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    chosen = [m for m in MUTATIONS if not names or m.name in names]
    errors = check_patterns(ROOT, chosen)
    if len({m.name for m in MUTATIONS}) != len(MUTATIONS):
        errors.append("two mutations share a name")
    if args.list:
        for m in chosen:
            print(
                f"{m.name:44s} {m.path:38s} tests: {' '.join(m.tests)}"
                + (f"\n{'':44s} accepted survivor: {m.accepted}" if m.accepted else "")
            )
        print(f"{len(chosen)} mutations")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 2
    if args.list:
        return 0

    base = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="vk-mutations-"))
    works = [base / f"copy{i}" for i in range(args.jobs)]
    pool: "queue.Queue[Path]" = queue.Queue()
    for w in works:
        w.mkdir(parents=True, exist_ok=True)
        sync_copy(ROOT, w)
        pool.put(w)
    print(f"mutation testing: {len(chosen)} mutations, {args.jobs} job(s), copies under {base}", flush=True)

    def in_copy(fn):
        w = pool.get()
        try:
            return fn(w)
        finally:
            pool.put(w)

    t_start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as ex:
        if not args.no_baseline:
            selections = sorted({m.tests for m in chosen})
            futs = {ex.submit(in_copy, lambda w, s=s: run_tests(w, s, args.timeout)): s for s in selections}
            broken = []
            for f in concurrent.futures.as_completed(futs):
                status, dt, why = f.result()
                print(f"  baseline {status:7s} {dt:6.0f} s  {' '.join(futs[f])}", flush=True)
                if status != "pass":
                    broken.append(f"{' '.join(futs[f])}: {why}")
            if broken:
                print("baseline failed (fix the tests first):\n  " + "\n  ".join(broken), file=sys.stderr)
                return 2

        def one(m: Mutation):
            def go(w: Path):
                original = apply(w, m)
                try:
                    return run_tests(w, m.tests, args.timeout)
                finally:
                    (w / m.path).write_text(original)

            return in_copy(go)

        futs2 = {ex.submit(one, m): m for m in chosen}
        results: Dict[str, Tuple[str, float, str]] = {}
        for f in concurrent.futures.as_completed(futs2):
            m = futs2[f]
            status, dt, why = f.result()
            results[m.name] = (status, dt, why)
            verdict = "killed" if status != "pass" else ("survived (accepted)" if m.accepted else "SURVIVED")
            print(f"  {verdict:20s} {dt:6.0f} s  {m.name}" + (f"\n      by {why}" if why else ""), flush=True)

    killed = [m for m in chosen if results[m.name][0] != "pass"]
    survived = [m for m in chosen if results[m.name][0] == "pass"]
    print(
        f"\nscore: {len(killed)}/{len(chosen)} mutations killed ({100.0 * len(killed) / len(chosen):.1f}%) "
        f"in {time.perf_counter() - t_start:.0f} s"
    )
    for m in survived:
        print(f"  survived: {m.name}" + (f" (accepted: {m.accepted})" if m.accepted else " (NOT accepted)"))
    if not args.workdir:
        shutil.rmtree(base, ignore_errors=True)
    return 0 if all(m.accepted for m in survived) else 1


if __name__ == "__main__":
    sys.exit(main())

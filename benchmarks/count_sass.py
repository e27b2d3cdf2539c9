"""Instructions per decoded element in the TurboQuant decode kernel's main loop (no GPU needed).

Compiles ``turboquant_attention_kernel`` for an H100 (sm_90) with the Triton
installed here, disassembles it with the ``nvdisasm`` that ships inside
Triton, finds the main loop (the longest backward branch) and divides its
instruction count by the K and V elements one thread decodes per iteration.
At 3 TB/s an H100 can issue about 2.4 instructions per thread per 2-bit
element (4.8 at 4 bits), so this count says how far from the memory roofline
a decoder can get. Decode shapes: GQA 32/8 (16-row tiles), head dim 128,
pages of 16, the backend's tile size for each decoder.

    python benchmarks/count_sass.py            # the table
    python benchmarks/count_sass.py --check    # only compile every kernel variant (the plugin's tests run this)

Match the Triton version of the GPU you care about: code generation changes
between releases.
"""
from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernelplane_quant_turboquant import kernels
from kernelplane_quant_turboquant.backend import COMBINE_OUT_CHUNK
from kernelplane_quant_turboquant.codec import TurboQuantCodec
from kernelplane_quant_turboquant.decode_asm import decode_asm
from kernelplane_quant_turboquant.packing import main_bits, num_fields

HKV, GROUP, D, PAGE = 8, 4, 128, 16
CASES = [  # (bits, lookup, keys per step, pipeline stages): each decoder at the backend's tile
    (2, 1, 64, 2), (2, 2, 64, 2), (2, 3, 128, 3), (3, 1, 64, 2), (3, 2, 64, 2), (4, 1, 64, 2), (4, 2, 64, 2),
]
POINTERS = dict(q_ptr="*bf16", part_ptr="*fp32", lse_ptr="*fp32", kn_ptr="*fp16", vn_ptr="*fp16",
                k_table_ptr="*fp32", v_table_ptr="*fp32", qrot_hi_ptr="*bf16", qrot_lo_ptr="*bf16",
                block_tables_ptr="*i32", seq_lens_ptr="*i32", query_start_loc_ptr="*i32",
                tail_k_ptr="*bf16", tail_v_ptr="*bf16", seq_slots_ptr="*i32")
SCALARS = dict(num_kv_heads="i32", score_scale="fp32", value_scale="fp32", window="i32", tokens_per_split="i32",
               stride_qt="i32", stride_qh="i32", stride_pt="i32", stride_ph="i32", stride_ps="i32",
               stride_lt="i32", stride_lh="i32", stride_bt="i32", tail_window="i32", tail_capacity="i32",
               tail_score_scale="fp32", tail_split="i32", stride_tks="i32", stride_tke="i32", stride_tkh="i32", stride_tvs="i32",
               stride_tve="i32", stride_tvh="i32")


def compile_case(bits: int, lookup: int, block_n: int, stages: int, rotated_query: bool = False,
                 tail: int = 0):
    fn = kernels.turboquant_attention_kernel
    row = D * bits // 8 if lookup == 3 else D * bits // 32  # bytes, or int32 words
    code_ptr = "*u8" if lookup == 3 else "*i32"
    table = TurboQuantCodec(bits, D, seed=1).table
    asm = decode_asm(bits, table) if lookup == 2 else ""
    constants = dict(
        stride_kcb=HKV * PAGE * row, stride_kct=row, stride_kch=PAGE * row,
        stride_knb=HKV * PAGE, stride_knt=1, stride_knh=PAGE,
        stride_vcb=HKV * PAGE * row, stride_vct=row, stride_vch=PAGE * row,
        stride_vnb=HKV * PAGE, stride_vnt=1, stride_vnh=PAGE,
        GROUP=GROUP, BLOCK_M=16, BLOCK_Q=1, BLOCK_N=block_n, PAGE=PAGE, HEAD_DIM=D, HEAD_DIM_V=D, ROT_CHUNK=32,
        BITS=bits, FIELDS=4 if bits < 4 else 2, LOOKUP=lookup, K_ASM=asm, V_ASM=asm, CAUSAL=True, HAS_WINDOW=False,
        COMPUTE_DTYPE=tl.float16, PRECISION="ieee", UPCAST=False, ROTATED_QUERY=rotated_query, TAIL=tail)
    signature = dict(POINTERS, kc_ptr=code_ptr, vc_ptr=code_ptr, **SCALARS)
    if rotated_query:
        signature["q_ptr"] = "*fp32"
    signature.update({name: "constexpr" for name in constants})
    # As at a real launch: tensors 16-byte aligned, strides multiples of 16.
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if signature.get(name, "").startswith("*") or (name.startswith("stride") and name not in constants)}
    source = ASTSource(fn=fn, signature=signature, attrs=aligned,
                       constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=stages))


def compile_write_case(bits: int, dim: int, norm_mode: int, rotated: bool, exact_tail: bool = False,
                       search: int = 1):
    """The fused quantize-on-write kernel (``write_kernel``) for sm_90; ``search``: the
    codec's ``scale_search``."""
    from kernelplane_quant_turboquant import write_kernel

    fn = write_kernel.quantize_write_kernel
    pointers = dict(x_ptr="*bf16", offset_ptr="*fp32", rot_ptr="*fp32", thresholds_ptr="*fp32", code_of_cell_ptr="*i64",
                    table_ptr="*fp32", scales_ptr="*fp32", slot_ptr="*i64", codes_ptr="*u8", norms_ptr="*fp16", tail_ptr="*bf16",
                    tail_index_ptr="*i64")
    strides = {name: "i32" for name in fn.arg_names if name.startswith("stride")}
    constants = dict(PAGE=PAGE, DIM=dim, BITS=bits, FIELDS=num_fields(bits), MAIN_BITS=main_bits(bits), KCHUNK=16,
                     HAS_OFFSET=not rotated, NORM_MODE=norm_mode, ROTATED=rotated, HAS_TAIL=exact_tail,
                     SEARCH=search, SEARCH_BLOCK=triton.next_power_of_2(search))
    if rotated:
        pointers["x_ptr"] = "*fp32"
    signature = {**pointers, **strides, **{name: "constexpr" for name in constants}}
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def compile_combine_case():
    """The split combine (merge by log-sum-exp, rotate back) for sm_90."""
    fn = kernels.combine_splits_kernel
    constants = dict(GROUP=GROUP, BLOCK_H=GROUP, BLOCK_S=64, SPLIT_CHUNK=16, HEAD_DIM_V=D, OUT_CHUNK=COMBINE_OUT_CHUNK,
                     REPEAT=16 // GROUP, OUT_COLS=D, UPCAST=False)
    pointers = dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr="*bf16", orot_hi_ptr="*bf16", orot_lo_ptr="*bf16")
    signature = {n: pointers.get(n, "constexpr" if n in constants else "i32") for n in fn.arg_names}
    source = ASTSource(fn=fn, signature=signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))


def compile_gluon_case(has_tail: bool = False, dim: int = D, bits: int = 2, max_registers: int = 0, **constexprs):
    """The Gluon decode kernel (``gluon_decode``) for ``bits``-bit codes on sm_90, one warp;
    ``constexprs`` override the kernel's defaults (``RESCALE_SLACK=4.0``, say)."""
    from triton.experimental.gluon._runtime import GluonASTSource

    from kernelplane_quant_turboquant import gluon_decode

    fn = gluon_decode.turboquant_decode_gluon
    row = dim * bits // 8
    constants = dict(stride_kcb=HKV * PAGE * row // 4, stride_kct=row // 4, stride_kch=PAGE * row // 4,
                     stride_knb=HKV * PAGE // 2, stride_knt=1, stride_knh=PAGE // 2, stride_vcb=HKV * PAGE * row // 4,
                     stride_vct=row // 4, stride_vch=PAGE * row // 4, stride_vnb=HKV * PAGE // 2, stride_vnt=1,
                     stride_vnh=PAGE // 2, GROUP=GROUP, BLOCK_N=gluon_decode.BLOCK_N, PAGE=PAGE,
                     HEAD_DIM=dim, HAS_TAIL=has_tail, RESCALE_SLACK=gluon_decode.RESCALE_SLACK,
                     UNROLL=gluon_decode.UNROLL, BITS=bits, **gluon_decode.KERNEL_ASM[bits])
    constants.update(constexprs)
    pointers = dict(q_ptr="*fp32", part_ptr="*fp32", lse_ptr="*fp32", kc_ptr="*i32", kn_ptr="*i32", vc_ptr="*i32",
                    vn_ptr="*i32", block_tables_ptr="*i32", seq_lens_ptr="*i32", query_start_loc_ptr="*i32",
                    tk_ptr="*bf16", tv_ptr="*bf16", seq_slots_ptr="*i32")
    signature = {n: pointers.get(n, "constexpr" if n in constants else "fp32" if "scale" in n or n == "k_step" else "i32")
                 for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if signature[n].startswith("*") or (n.startswith("stride") and n not in constants)}
    source = GluonASTSource(fn=fn, signature=signature, attrs=aligned,
                            constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=1, maxnreg=max_registers or gluon_decode.max_registers(bits)))


def check() -> int:
    """Compile every decode and write variant; the interpreter accepts code the compiler refuses."""
    for bits, lookup, block_n, stages in CASES:
        compile_case(bits, lookup, block_n, stages)
        print(f"decode kernel, {bits} bits, lookup {lookup}: compiled", flush=True)
    for bits, lookup, block_n, stages in ((2, 3, 128, 3), (3, 2, 64, 2)):
        compile_case(bits, lookup, block_n, stages, rotated_query=True)
        print(f"decode kernel, {bits} bits, lookup {lookup}, query rotated before: compiled", flush=True)
    for bits, lookup, block_n, stages, tail in ((2, 3, 128, 3, 3), (3, 2, 64, 2, 3), (4, 1, 64, 2, 1),
                                                (4, 1, 64, 2, 2)):
        compile_case(bits, lookup, block_n, stages, tail=tail)
        what = {1: "the codes around the exact tail", 2: "the exact tail alone", 3: "codes and exact tail"}[tail]
        print(f"decode kernel, {bits} bits, lookup {lookup}, {what}: compiled", flush=True)
    for bits, dim, norm_mode, rotated, search in ((2, 64, 0, False, 1), (3, 128, 2, False, 16), (4, 256, 1, False, 1),
                                                  (3, 128, 2, True, 16), (4, 64, 2, False, 12)):
        compile_write_case(bits, dim, norm_mode, rotated, search=search)
        print(f"write kernel, {bits} bits, dim {dim}{', rows rotated before' if rotated else ''}, "
              f"{search} scale(s): compiled", flush=True)
    for bits, dim, norm_mode, rotated, search in ((2, 64, 0, False, 1), (3, 128, 2, True, 16)):
        compile_write_case(bits, dim, norm_mode, rotated, exact_tail=True, search=search)
        print(f"write kernel, {bits} bits, dim {dim}, with the exact tail: compiled", flush=True)
    compile_combine_case()
    print("split combine: compiled", flush=True)
    from kernelplane_quant_turboquant import gluon_decode

    if gluon_decode.gluon is not None:
        for has_tail, dim, bits in ((False, 128, 2), (True, 64, 2), (False, 128, 3), (True, 64, 3), (False, 128, 4),
                                    (True, 64, 4)):
            compile_gluon_case(has_tail, dim, bits)
            print(f"Gluon {bits}-bit decode kernel, head dim {dim}"
                  f"{', codes around the exact tail' if has_tail else ''}: compiled", flush=True)
    return 0


def local_memory_accesses(cubin: bytes) -> int:
    """Loads and stores of local memory (``LDL`` / ``STL``) in the kernel: spilled registers."""
    return len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", _disassemble(cubin)))


def _disassemble(cubin: bytes) -> str:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


def _loops(cubin: bytes) -> tuple[list[str], list[tuple[int, int]]]:
    """The disassembly's opcodes, and its loops as (first, end) spans of them: every
    backward branch."""
    labels, ops, loops = {}, [], []
    for line in _disassemble(cubin).splitlines():
        label = re.match(r"^\s*\.(L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(ops)
            continue
        inst = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s*(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*)", line)
        if inst:
            ops.append(inst.group(1).split(".")[0])
            target = re.search(r"BRA\s+`?\(?\.?(L_x_\d+)", line)
            if target and target.group(1) in labels and labels[target.group(1)] < len(ops) - 1:
                loops.append((labels[target.group(1)], len(ops)))
    return ops, loops


def main_loop(cubin: bytes) -> list[str]:
    """Opcodes of the longest loop in the disassembly."""
    ops, loops = _loops(cubin)
    start, end = max(loops, key=lambda span: span[1] - span[0])
    return ops[start:end]


def innermost_load_loop(cubin: bytes) -> list[str]:
    """Opcodes of the shortest loop that loads from global memory: the Gluon kernel's main
    loop (its masked first and last steps and the exact tail's loop sit outside it, and
    the compiler's block order can make longer backward branches around it)."""
    ops, loops = _loops(cubin)
    start, end = min((span for span in loops if "LDG" in ops[span[0]:span[1]]), key=lambda span: span[1] - span[0])
    return ops[start:end]


def without_branches(ops: list[str]) -> list[str]:
    """``ops`` less the code between ``BSSY`` and ``BSYNC``: a branch that steps can skip
    (the Gluon kernel's rescale when the running maximum stays)."""
    kept, depth = [], 0
    for op in ops:
        depth += op == "BSSY"
        if depth == 0:
            kept.append(op)
        depth -= op == "BSYNC" and depth > 0
    return kept


def main() -> int:
    if "--check" in sys.argv[1:]:
        return check()
    print(f"triton {triton.__version__}, target sm_90, GQA {GROUP * HKV}/{HKV}, head dim {D}, 4 warps")
    print("| bits | decoder | keys/step | loop instructions | per K/V element | most frequent |")
    print("|---|---|---|---|---|---|")
    names = {1: "select tree", 2: "PTX prmt", 3: "float16 cubic"}
    for bits, lookup, block_n, stages in CASES:
        ops = main_loop(compile_case(bits, lookup, block_n, stages).asm["cubin"])
        per_thread = block_n * D * 2 / 128  # K and V elements per thread per iteration
        top = ", ".join(f"{op} {n}" for op, n in collections.Counter(ops).most_common(5))
        print(f"| {bits} | {names[lookup]} | {block_n} | {len(ops)} | {len(ops) / per_thread:.2f} | {top} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

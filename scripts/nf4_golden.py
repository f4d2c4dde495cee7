#!/usr/bin/env python3
"""Record bitsandbytes' NF4 quantization, exactly, for orpo's QLoRA unit tests.

Writes tests/fixtures/golden/extra/nf4.bnb.json: bitsandbytes' own outputs (CPU, float32) of
  quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=False / True)
and dequantize_4bit of each, for hand-made and random tensors and two real fixture weights, plus
the NF4 table, the 8-bit dynamic table of the double quantization, and the list of modules
transformers turns into bnb.nn.Linear4bit when loading each fixture with BitsAndBytesConfig.

Every float is written so that parsing it as f64 and casting to f32 gives the exact f32 value.
The script checks each bnb output against a pure-numpy model of the algorithm (below, `ref_*`),
so the recipe the Rust side implements is pinned here too:

  4-bit (bnb's "default" torch kernel; bnb 0.50.2 registers no CPU quantize_4bit):
    the tensor flattened row-major, cut into blocks of 64 across row ends; absmax = max |x|;
    full blocks scale by a reciprocal, x * f32(1 / max(absmax, 1e-38)); the short last block
    DIVIDES, x / max(absmax, 1e-38); clamp to [-1, 1]; code = bucketize over the 15 f32
    midpoints (code[i] + code[i+1]) / 2 with right=False: a value equal to a midpoint takes
    the LOWER code; an odd count is padded with one 0.0 (code 7); packed byte = even element
    << 4 | odd element.
  dequant: code[q] * absmax (one f32 multiply).
  double quant: offset = torch.mean(absmax) (f32, torch's cascade sum, see ref_torch_mean);
    x = absmax - offset; 8-bit blockwise with blocksize 256 by bnb's CPU C kernel, which is a
    65536-entry lookup table, not nearest-code search (see ref_quantize_8bit_lut);
    dequantized absmax = dynamic_code[q8] * state2_absmax (f32) + offset (f32).

Needs: torch, bitsandbytes, transformers, safetensors, numpy.
Usage: python3 scripts/nf4_golden.py [OUT.json]
"""
import json
import re
import sys

import numpy as np
import torch
import bitsandbytes
import bitsandbytes.functional as F
import transformers
from bitsandbytes.backends.utils import _get_4bit_code
from safetensors.torch import load_file

f32 = np.float32
FIX = "tests/fixtures"
BLOCK = 64


def fl(values):
    """f32 values as the shortest decimals that parse (as f64, then cast) back to them."""
    out = []
    for v in np.asarray(values, dtype=f32).reshape(-1):
        s = float(str(v))
        if f32(s) != v or np.signbit(f32(s)) != np.signbit(v):
            s = float(v)
        out.append(s)
    return out


# ---------------------------------------------------------------- pure-numpy reference
NF4 = _get_4bit_code("nf4", "cpu").numpy().astype(f32)
NF4_BOUNDS = ((NF4[:-1] + NF4[1:]) / f32(2)).astype(f32)
DYN = F.create_dynamic_map(signed=True).numpy().astype(f32)
DYN_MID = (f32(0.5) * (DYN[:-1] + DYN[1:])).astype(f32)
LUT_VALS = (f32(-1.0) + (f32(2.0) * np.arange(65536, dtype=f32)) / f32(65535)).astype(f32)
DYN_LUT = np.searchsorted(DYN_MID, LUT_VALS, side="left").astype(np.uint8)  # #midpoints < val


def ref_quantize_4bit(x):
    x = np.asarray(x, dtype=f32).reshape(-1)
    n = len(x)
    full = n - n % BLOCK
    absmax, scaled = [], []
    for s in range(0, n, BLOCK):
        blk = x[s:s + BLOCK]
        am = f32(np.abs(blk).max())
        absmax.append(am)
        den = max(am, f32(1e-38))
        if s < full:
            scaled.append((blk * (f32(1.0) / den)).astype(f32))
        else:
            scaled.append((blk / den).astype(f32))
    scaled = np.clip(np.concatenate(scaled), f32(-1), f32(1))
    if n % 2:
        scaled = np.concatenate([scaled, [f32(0)]])
    q = np.searchsorted(NF4_BOUNDS, scaled, side="left").astype(np.uint8)
    return (q[0::2] << 4) | q[1::2], np.array(absmax, f32), scaled, q


def ref_dequantize_4bit(packed, absmax, n):
    q = np.stack([packed >> 4, packed & 15], 1).reshape(-1)[:n]
    return (NF4[q] * np.asarray(absmax, f32)[np.arange(n) // BLOCK]).astype(f32)


def ref_multi_row_sum(rows):
    # ATen SumKernel.cpp multi_row_sum: 4 cascade levels, level_step = 2^max(4, ceil_log2(n)/4).
    size = rows.shape[0]
    power = max(4, (int(np.ceil(np.log2(size))) if size > 1 else 0) // 4)
    step, mask = 1 << power, (1 << power) - 1
    acc = [np.zeros(rows.shape[1:], f32) for _ in range(4)]
    i = 0
    while i + step <= size:
        for j in range(step):
            acc[0] = (acc[0] + rows[i + j]).astype(f32)
        for j in range(1, 4):
            acc[j] = (acc[j] + acc[j - 1]).astype(f32)
            acc[j - 1] = np.zeros_like(acc[j - 1])
            if i & (mask << (j * power)):
                break
        i += step
    for k in range(i, size):
        acc[0] = (acc[0] + rows[k]).astype(f32)
    for j in range(1, 4):
        acc[0] = (acc[0] + acc[j]).astype(f32)
    return acc[0]


def ref_row_sum(x):
    # ATen row_sum: 4 interleaved accumulators (ilp), then a scalar tail, then folded 1..3 into 0.
    size_ilp = x.shape[0] // 4
    if size_ilp:
        ps = ref_multi_row_sum(x[:size_ilp * 4].reshape((size_ilp, 4) + x.shape[1:])).copy()
    else:
        ps = np.zeros((4,) + x.shape[1:], f32)
    for i in range(size_ilp * 4, x.shape[0]):
        ps[0] = (ps[0] + x[i]).astype(f32)
    for k in range(1, 4):
        ps[0] = (ps[0] + ps[k]).astype(f32)
    return ps[0]


def ref_torch_mean(x, width=8):
    """torch.mean of a contiguous f32 vector on CPU (single thread, n <= 32768): the cascade sum
    over 8-lane vectors (vectorized_inner_sum), the tail elements summed first, then the 8 lanes
    in order; then one f32 division by n."""
    x = np.asarray(x, f32)
    n = len(x)
    if n >= width:
        nv = n // width
        lanes = ref_row_sum(x[:nv * width].reshape(nv, width))
        acc = f32(0)
        for k in range(nv * width, n):
            acc = f32(acc + x[k])
        for k in range(width):
            acc = f32(acc + lanes[k])
    else:
        acc = f32(ref_row_sum(x))
    return f32(acc / f32(n))


def ref_quantize_8bit_lut(x, blocksize=256):
    """bnb 0.50.2's CPU quantize_blockwise (csrc/cpu_ops.cpp quantize_cpu_impl, AVX2 and scalar
    paths alike): absmax = max |x| per block; a zero block gives code 0 everywhere; otherwise
    v = clamp(x * f32(1 / absmax), -1, 1); i = trunc(((v + 1) * 0.5) * 65535 + 0.5) (each op in
    f32); code = LUT[i], LUT[i] = number of code midpoints 0.5 * (c[k] + c[k+1]) strictly below
    the bin value -1 + (2 * i) / 65535 (f32). Not nearest-code: values within half a bin width
    (1.5e-5 of absmax) of a midpoint, and everything tiny, can take a farther code."""
    x = np.asarray(x, f32)
    out = np.zeros(len(x), np.uint8)
    absmax = []
    for s in range(0, len(x), blocksize):
        blk = x[s:s + blocksize]
        am = f32(np.abs(blk).max())
        absmax.append(am)
        if am == 0:
            continue
        v = np.clip((blk * (f32(1.0) / am)).astype(f32), f32(-1), f32(1))
        t = ((((v + f32(1)) * f32(0.5)).astype(f32) * f32(65535)).astype(f32) + f32(0.5)).astype(f32)
        out[s:s + blocksize] = DYN_LUT[t.astype(np.int64)]
    return out, np.array(absmax, f32)


# ---------------------------------------------------------------- cases
def ties_input():
    """Values that sit exactly on NF4 midpoints (times absmax), one f32 step either side, the
    codes themselves, in blocks whose absmax is 1, -2 (negative largest), 0.3 and -3."""
    row = [f32(1.0), f32(-1.0), f32(0.5), f32(-0.5), f32(0.0)]
    for b in NF4_BOUNDS:
        row += [b, np.nextafter(b, f32(2)), np.nextafter(b, f32(-2))]
    row += list(NF4[1:15])
    row = np.array(row, f32)
    assert len(row) == 64
    r1 = (row * f32(-2.0)).astype(f32)
    r1[1] = f32(0.25)  # the only magnitude-2 value left is -2.0: a negative absmax element
    r2 = (row * f32(0.3)).astype(f32)
    r3 = (row * f32(3.0)).astype(f32)
    r3[1] = f32(0.75)  # leaves -3.0 as the largest magnitude
    return np.stack([row, r1, r2, r3]).astype(f32)


def division_input():
    """[1, 70]: the same six values in a full block (scaled by a reciprocal) and in the short
    last block (divided), chosen so that x * (1/a) and x / a fall on opposite sides of a midpoint."""
    a = f32(1.7)
    inv = f32(1.0) / a
    vals = []
    for b in NF4_BOUNDS:
        x = f32(b * a)
        for cand in (x, np.nextafter(x, f32(9)), np.nextafter(x, f32(-9))):
            m = np.searchsorted(NF4_BOUNDS, f32(cand * inv), side="left")
            d = np.searchsorted(NF4_BOUNDS, f32(cand / a), side="left")
            if m != d and cand not in vals:
                vals.append(cand)
    assert len(vals) >= 5, vals
    vals = vals[:6]
    blk0 = np.concatenate([[a], vals, np.random.default_rng(9).uniform(-a, a, 63 - len(vals)).astype(f32)])
    blk1 = np.concatenate([vals[:5], [-a]])
    return np.concatenate([blk0, blk1]).astype(f32).reshape(1, 70)


def lut_input():
    rng = np.random.default_rng(11)
    absmax = [1.0, 3.0, 2.0, 2.0, 2.0 + 2.0 ** -20, 2.0 - 2.0 ** -20]
    rows = []
    for r, a in enumerate(absmax):
        a = f32(a)
        row = (rng.uniform(-0.5, 0.5, 64) * a).astype(f32)
        row[(r * 11) % 64] = a if r % 2 == 0 else -a
        rows.append(row)
    return np.stack(rows).astype(f32)


def cases():
    out = []

    def randn(seed, *shape):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(*shape, generator=g, dtype=torch.float32)

    out.append(("randn_8x64", randn(1, 8, 64), "torch.randn seed 1"))
    out.append(("randn_3x50", randn(2, 3, 50), "150 values: blocks of 64, 64 and a short 22 (divided), blocks across rows"))
    out.append(("randn_1x7", randn(3, 1, 7), "odd count: the last byte's low nibble is the 0.0 pad (code 7)"))
    out.append(("randn_16x128", randn(4, 16, 128), "torch.randn seed 4"))
    z = randn(5, 4, 64)
    z[1] = 0.0
    out.append(("zero_block_4x64", z, "block 1 all zeros: absmax 0, every code 7 (0.0), dequantized 0"))
    out.append(("ties_4x64", torch.from_numpy(ties_input()), "values on the NF4 midpoints times absmax (1, -2, 0.3, -3), one f32 step either side, and the codes"))
    out.append(("division_1x70", torch.from_numpy(division_input()), "the same values scaled by a reciprocal in block 0 and divided in the short block 1 land on different codes"))
    out.append(("rows_straddle_blocks_4x48", randn(6, 4, 48), "rows of 48 (a multiple of 16, not of 64): bnb 0.50.2's AVX-512 CPU dequantize_4bit indexes absmax per row and gets it wrong; `dequantized` is the correct flat-block result (bnb's torch kernel, as CUDA), `dequantized_bnb_cpu_avx512` what the C kernel returns here"))
    big = randn(10, 264, 64) * torch.exp(randn(11, 264, 1))
    out.append(("randn_264x64", big, "264 absmax values: the double quantization's 8-bit step has two blocks (256 + 8); rows scaled by exp(randn)"))
    out.append(("lut_not_nearest_6x64", torch.from_numpy(lut_input()), "block absmax 1, 3, 2, 2, 2 + 2^-20, 2 - 2^-20: offset exactly 2, so four deviations are 0 or +-2^-20 of the 8-bit block's absmax 1; bnb's lookup table gives them the code nearest 1.5e-5, not the nearest code"))
    llama = load_file(f"{FIX}/tiny-llama3/model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    out.append(("tiny-llama3.model.layers.0.self_attn.q_proj.weight", llama.float().contiguous(), "the fixture's weight, as transformers quantizes it"))
    opt = load_file(f"{FIX}/tiny-opt/model.safetensors")["model.decoder.layers.0.fc1.weight"]
    out.append(("tiny-opt.model.decoder.layers.0.fc1.weight", opt.float().contiguous(), "the fixture's weight, as transformers quantizes it"))
    return out


def model_check():
    """Load both fixtures with BitsAndBytesConfig (plain and double quant): the Linear4bit
    modules, and whether each one's packed weight and statistics equal quantize_4bit's of the
    f32 checkpoint tensor (row-major, blocksize 64)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    report = {}
    for fx in ("tiny-opt", "tiny-llama3"):
        d = f"{FIX}/{fx}"
        sd = load_file(f"{d}/model.safetensors")
        entry = {}
        for dq in (False, True):
            model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=dq,
                bnb_4bit_compute_dtype=torch.float32))
            names = [n for n, m in model.named_modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
            same = True
            for n in names:
                w = model.get_submodule(n).weight
                p, s = F.quantize_4bit(sd[n + ".weight"].float().contiguous(), blocksize=64, quant_type="nf4",
                                       compress_statistics=dq)
                qs = w.quant_state
                same &= torch.equal(p, w.data) and torch.equal(s.absmax, qs.absmax) and qs.blocksize == 64
                same &= w.data.dtype == torch.uint8 and tuple(w.data.shape) == (sd[n + ".weight"].numel() // 2, 1)
                if dq:
                    same &= (torch.equal(s.offset, qs.offset) and torch.equal(s.state2.absmax, qs.state2.absmax)
                             and qs.state2.blocksize == 256 and torch.equal(qs.state2.code, torch.from_numpy(DYN)))
            key = "double_quant" if dq else "plain"
            entry[key] = dict(quantized_modules=names, matches_quantize_4bit_of_checkpoint=bool(same))
            entry["lm_head_quantized"] = isinstance(model.lm_head, bitsandbytes.nn.Linear4bit)
            entry["tie_word_embeddings"] = bool(model.config.tie_word_embeddings)
        assert entry["plain"]["quantized_modules"] == entry["double_quant"]["quantized_modules"]
        report[fx] = dict(quantized_modules=entry["plain"]["quantized_modules"],
                          lm_head_quantized=entry["lm_head_quantized"],
                          tie_word_embeddings=entry["tie_word_embeddings"],
                          loaded_equals_direct_quantize_4bit=dict(
                              plain=entry["plain"]["matches_quantize_4bit_of_checkpoint"],
                              double_quant=entry["double_quant"]["matches_quantize_4bit_of_checkpoint"]))
    return report


def record(name, A, note):
    shape = list(A.shape)
    n = A.numel()
    x = A.numpy().astype(f32).reshape(-1)
    p, st = F.quantize_4bit(A, blocksize=BLOCK, quant_type="nf4", compress_statistics=False)
    deq = F.dequantize_4bit(p, st)
    packed = p.numpy().reshape(-1)
    absmax = st.absmax.numpy()

    # the pure-numpy model must agree with bnb bit for bit
    rp, ra, scaled, q = ref_quantize_4bit(x)
    assert np.array_equal(rp, packed), name
    assert np.array_equal(ra, absmax), name
    rd = ref_dequantize_4bit(packed, absmax, n)
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    torch_deq = _dequantize_4bit_compute.__wrapped__(p.reshape(-1), st.absmax, torch.from_numpy(NF4), BLOCK, tuple(shape),
                                         torch.float32).numpy().reshape(-1)
    assert np.array_equal(torch_deq, rd), name
    bnb_deq = deq.numpy().reshape(-1)
    plain = dict(packed=packed.tolist(), absmax=fl(absmax), dequantized=fl(rd))
    if not np.array_equal(bnb_deq, rd):
        plain["dequantized_bnb_cpu_avx512"] = fl(bnb_deq)

    # exact ties: scaled value equal to a midpoint
    ties = []
    for i in range(n):
        hit = np.nonzero(NF4_BOUNDS == scaled[i])[0]
        if len(hit):
            ties.append(dict(index=i, scaled=fl([scaled[i]])[0], midpoint=int(hit[0]), code=int(q[i])))

    p2, st2 = F.quantize_4bit(A, blocksize=BLOCK, quant_type="nf4", compress_statistics=True)
    assert torch.equal(p2, p)
    deq2 = F.dequantize_4bit(p2, st2).numpy().reshape(-1)
    absmax_dq = (F.dequantize_blockwise(st2.absmax, st2.state2) + st2.offset).numpy()
    offset = f32(st2.offset.item())
    assert ref_torch_mean(absmax) == offset, name
    q8, am8 = ref_quantize_8bit_lut((absmax - offset).astype(f32))
    assert np.array_equal(q8, st2.absmax.numpy()), name
    assert np.array_equal(am8, st2.state2.absmax.numpy()), name
    r_absmax_dq = ((DYN[q8] * np.repeat(am8, 256)[:len(q8)]).astype(f32) + offset).astype(f32)
    assert np.array_equal(r_absmax_dq, absmax_dq), name
    rd2 = ref_dequantize_4bit(packed, absmax_dq, n)
    double = dict(qabsmax=st2.absmax.numpy().tolist(), offset=fl([offset])[0],
                  state2_absmax=fl(st2.state2.absmax.numpy()), state2_blocksize=st2.state2.blocksize,
                  absmax_dequantized=fl(absmax_dq), dequantized=fl(rd2))
    if not np.array_equal(deq2, rd2):
        double["dequantized_bnb_cpu_avx512"] = fl(deq2)
    scale8 = np.repeat(am8, 256)[:len(q8)]
    safe = np.where(scale8 == 0, f32(1), scale8)
    near = np.where(scale8 == 0, q8, np.abs(((absmax - offset) / safe)[:, None] - DYN[None, :]).argmin(1))
    double["lut_codes_differing_from_nearest"] = int((near != q8).sum())
    return dict(name=name, note=note, shape=shape, input=fl(x), exact_ties=ties, plain=plain,
                double_quant=double)


def compact(text):
    # one line per flat number list
    return re.sub(r"\[\s*([-0-9.enul,\s]+?)\s*\]", lambda m: "[" + ",".join(m.group(1).split()).replace(",,", ",") + "]", text)


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else f"{FIX}/golden/extra/nf4.bnb.json"
    torch.set_num_threads(1)
    lut_first = [int(np.argmax(DYN_LUT == c)) if (DYN_LUT == c).any() else None for c in range(256)]
    data = dict(
        source="bitsandbytes quantize_4bit / dequantize_4bit / quantize_blockwise on CPU, float32 "
               "(scripts/nf4_golden.py); every bnb output checked bit for bit against the script's numpy model",
        versions=dict(bitsandbytes=bitsandbytes.__version__, torch=torch.__version__,
                      transformers=transformers.__version__,
                      torch_cpu_capability=torch.backends.cpu.get_cpu_capability()),
        blocksize=BLOCK, quant_type="nf4",
        nf4_code=fl(NF4),
        nf4_bounds=fl(NF4_BOUNDS),
        dynamic_code=fl(DYN),
        dynamic_lut_first_index=lut_first,
        models=model_check(),
        cases=[record(*c) for c in cases()],
    )
    text = compact(json.dumps(data, indent=1))
    json.loads(text)
    open(out_path, "w").write(text + "\n")
    print(out_path, len(text))


if __name__ == "__main__":
    main()

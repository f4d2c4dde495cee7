#!/usr/bin/env python3
"""Record bitsandbytes' 8-bit AdamW, exactly, for orpo's `adamw_bnb_8bit` unit tests.

Writes tests/fixtures/golden/extra/adamw8bit.bnb.json: three steps of
  bnb.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, optim_bits=8)
on CPU (float32) over four parameters with given gradients, and after each step every
parameter and its optimizer state: for 8-bit states the uint8 codes, the f32 absmax per block
of 256 and the dequantized state; for 32-bit states the f32 state. Plus bnb's two code tables.

  tensor    shape      group (weight_decay)  state   gradients
  w64x64    [64, 64]   0 (0.1)               8-bit   randn * 1e-2; step 2 all zero
  v5000     [5000]     0 (0.1)               8-bit   randn * 10^U(-4,0) (wide range); step 1:
                                                     block 3 (768..1023) and the short last
                                                     block (4864..4999, 136 values) zero
  n16x256   [16, 256]  1 (0.0)               8-bit   randn * 1e-4
  b3000     [3000]     0 (0.1)               32-bit  randn * 3e-3 (3000 < min_8bit_size 4096)
Initial parameters are randn * 0.5 (torch.manual_seed 0 generator, then the gradients in step
order); every initial value and gradient is rounded to 3 significant decimal digits before use,
so the file writes them short.

fix_bnb_cpu_quant=1 (default; the TRL scripts share `fix_bnb_cpu_quant` below): bitsandbytes
0.50.2's CPU C kernel for quantize_blockwise (cquantize_blockwise_cpu_fp32) looks codes up in a
65536-entry table over [-1, 1], so values within 2^-15 of absmax apart get one code and every
small second moment takes the same wrong code; bnb's CUDA kernels and its own torch kernel
("default", bitsandbytes/backends/default/ops.py) take the nearest code. The CPU kernel is
replaced by that torch kernel (through the dispatcher: the op's CompositeExplicitAutograd
kernel), and the replacement is checked live.

The script checks every bnb output bit for bit against its numpy model (`ref_*` below), so the
recipe orpo implements is pinned here too. All arithmetic is f32 unless said; fma(a, b, c) is
a * b + c rounded once (torch's vectorized CPU kernels fuse add_(x, alpha) and addcmul_ so),
and sqrt is torch's (AVX-512: not always the correctly rounded f32, 1 ulp off for a few values
in a thousand). c1 = 1 - b1^t and c2 = sqrt(1 - b2^t) are f64, t the parameter's step count.
  8-bit state (numel >= 4096): per step
    m = code1[q1] * absmax1[i // 256]; v = code2[q2] * absmax2[i // 256]     (dequantize)
    m = fma(g, f32(1 - b1), m * f32(b1));  v = fma(g * f32(1 - b2), g, v * f32(b2))
    denom = sqrt(v) / f32(c2) + f32(eps)
    if wd > 0: p = p * f32(1 - lr * wd)          (decoupled, before the Adam step)
    p = p + (f32(-lr / c1) * m) / denom
    requantize m with code1 (signed), v with code2 (unsigned): absmax = max |x| per block of
    256 (a short last block's absmax is clamped to 1e-38, so an all-zero short block stores
    f32(1e-38) while an all-zero full block stores 0); full blocks x * f32(1 / max(absmax,
    1e-38)), the short last block x / max(absmax, 1e-38); clamp to [-1, 1]; code = the number
    of midpoints f32(code[k] + code[k+1]) / 2 strictly below (a midpoint takes the lower code).
    The update uses m and v before requantization, so step 1 moves p exactly as f32 Adam does.
    A v that quantizes to code 0 under a nonzero m makes the next step ~ lr * m / (c1 * eps)
    when that step's gradient is 0 (w64x64 at step 2).
  32-bit state (numel < 4096, or an optim_bits=32 override):
    m = fma(g, f32(1 - b1), m * f32(b1));  v = fma(g * f32(1 - b2), g, v * f32(b2))
    if wd > 0: p = p * f32(1 - lr * wd)
    p = fma(m / (sqrt(v) + f32(eps * c2)), f32(-lr * c2 / c1), p)
  `step` is per parameter (state["step"], incremented only when the parameter has a gradient:
  parameters whose .grad is None are skipped entirely, no decay either); a zero gradient
  (not None) is a full step.

Needs: torch, bitsandbytes, numpy.
Usage: python3 scripts/adamw8bit_golden.py [OUT.json] [fix_bnb_cpu_quant=1] [dequantized=last]
An 8-bit tensor's dequantized state1/state2 (qmap[code] * absmax[i // 256], checked equal to bnb's
dequantize_blockwise at every step) is written for the last step only (dequantized=all: every
step, 2.6 MB instead of 1.8 MB).
"""
import json
import re
import sys

import numpy as np
import torch
import bitsandbytes
import bitsandbytes.functional as F

f32 = np.float32
BLOCK = 256
LR, BETAS, EPS, WD, STEPS = 1e-2, (0.9, 0.999), 1e-8, 0.1, 3


# ---------------------------------------------------------------- the CPU quantize fix
def bnb_cpu_quant_is_nearest():
    """Whether torch.ops.bitsandbytes.quantize_blockwise on CPU takes the nearest code: 1e-6 in a
    block with absmax 1 must get the unsigned dynamic code 2 (7.75e-7), not the table's 7."""
    code = F.create_dynamic_map(signed=False)
    a = torch.zeros(BLOCK)
    a[0], a[1] = 1.0, 1e-6
    q, _ = torch.ops.bitsandbytes.quantize_blockwise(a, code, BLOCK)
    return int(q[1]) == int((code - 1e-6).abs().argmin()) == 2


def use_bnb_torch_quant_on_cpu():
    """Route bitsandbytes::quantize_blockwise on CPU to bitsandbytes' own torch kernel, the one it
    registers for "default" (the CompositeExplicitAutograd dispatch key)."""
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def quantize_blockwise(A, code, blocksize):
        return op.redispatch(keys, A, code, blocksize)

    torch.library.register_kernel("bitsandbytes::quantize_blockwise", "cpu", quantize_blockwise)


def fix_bnb_cpu_quant():
    """Apply the fix when bnb's CPU quantizer is the lookup table; returns whether it did."""
    if bnb_cpu_quant_is_nearest():
        return False
    use_bnb_torch_quant_on_cpu()
    assert bnb_cpu_quant_is_nearest(), "quantize_blockwise fix not live"
    return True


# ---------------------------------------------------------------- shared with the TRL scripts
def is_bnb_optim(optim):
    """Whether transformers' TrainingArguments.optim names a bitsandbytes optimizer."""
    from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS
    return optim in {str(o.value) for o in _BITSANDBYTES_OPTIMIZERS}


def optimizer_state_bits(optimizer, named_parameters, rename=lambda n: n):
    """{parameter name: 8 or 32} from a bitsandbytes optimizer's state (state1 uint8 or f32),
    over its param groups in order; `optimizer` may be accelerate's wrapper."""
    opt = getattr(optimizer, "optimizer", optimizer)
    names = {id(p): n for n, p in named_parameters}
    bits = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            assert "state1" in st, f"{names[id(p)]}: no optimizer state"
            bits[rename(names[id(p)])] = {torch.uint8: 8, torch.float32: 32}[st["state1"].dtype]
    return bits


# ---------------------------------------------------------------- numpy model
QMAP1 = F.create_dynamic_map(signed=True).numpy().astype(f32)
QMAP2 = F.create_dynamic_map(signed=False).numpy().astype(f32)


def ref_quantize(x, code):
    x = np.asarray(x, f32).reshape(-1)
    n = len(x)
    full = n - n % BLOCK
    mids = ((code[:-1] + code[1:]).astype(f32) / f32(2)).astype(f32)
    absmax, scaled = [], []
    for s in range(0, n, BLOCK):
        blk = x[s:s + BLOCK]
        am = f32(np.abs(blk).max())
        den = max(am, f32(1e-38))
        if s < full:
            absmax.append(am)
            scaled.append((blk * (f32(1.0) / den)).astype(f32))
        else:
            absmax.append(den)
            scaled.append((blk / den).astype(f32))
    scaled = np.clip(np.concatenate(scaled), f32(-1), f32(1))
    return np.searchsorted(mids, scaled, side="left").astype(np.uint8), np.array(absmax, f32)


def ref_dequantize(q, absmax, code):
    q = np.asarray(q).reshape(-1)
    return (code[q.astype(np.int64)] * np.asarray(absmax, f32)[np.arange(len(q)) // BLOCK]).astype(f32)


def fma(a, b, c):
    """f32 a * b + c rounded once (torch's vectorized CPU kernels fuse these: add_ with alpha,
    addcmul_); the f32 product is exact in f64."""
    return (np.asarray(a, f32).astype(np.float64) * np.asarray(b, f32).astype(np.float64)
            + np.asarray(c, f32).astype(np.float64)).astype(f32)


def tsqrt(x):
    """torch's CPU sqrt: on AVX-512 not always the correctly rounded f32 (1 ulp off for a few
    values in a thousand), so the model borrows it to stay bit-exact."""
    return torch.from_numpy(np.ascontiguousarray(x, f32)).sqrt().numpy()


def ref_step_8bit(p, g, q1, q2, a1, a2, t, wd):
    b1, b2 = BETAS
    m = ref_dequantize(q1, a1, QMAP1)
    v = ref_dequantize(q2, a2, QMAP2)
    m = fma(g, f32(1.0 - b1), (m * f32(b1)).astype(f32))
    v = fma((g * f32(1.0 - b2)).astype(f32), g, (v * f32(b2)).astype(f32))
    c1, c2 = 1.0 - b1 ** t, np.sqrt(1.0 - b2 ** t)
    denom = ((tsqrt(v) / f32(c2)).astype(f32) + f32(EPS)).astype(f32)
    if wd > 0:
        p = (p * f32(1.0 - LR * wd)).astype(f32)
    p = (p + ((f32(-LR / c1) * m).astype(f32) / denom).astype(f32)).astype(f32)
    return (p, m, v) + ref_quantize(m, QMAP1) + ref_quantize(v, QMAP2)


def ref_step_32bit(p, g, m, v, t, wd):
    b1, b2 = BETAS
    m = fma(g, f32(1.0 - b1), (m * f32(b1)).astype(f32))
    v = fma((g * f32(1.0 - b2)).astype(f32), g, (v * f32(b2)).astype(f32))
    c1, c2 = 1.0 - b1 ** t, np.sqrt(1.0 - b2 ** t)
    if wd > 0:
        p = (p * f32(1.0 - LR * wd)).astype(f32)
    upd = (m / (tsqrt(v) + f32(EPS * c2)).astype(f32)).astype(f32)
    return fma(upd, f32(-LR * c2 / c1), p), m, v


# ---------------------------------------------------------------- output helpers
def fl(values):
    """f32 values as the shortest decimals that parse (as f64, then cast) back to them."""
    out = []
    for v in np.asarray(values, dtype=f32).reshape(-1):
        s = float(str(v))
        if f32(s) != v or np.signbit(f32(s)) != np.signbit(v):
            s = float(v)
        out.append(s)
    return out


def ints(values):
    return [int(v) for v in np.asarray(values).reshape(-1)]


def compact(text):
    # one line per flat number list
    return re.sub(r"\[\s*([-0-9.enul,\s]+?)\s*\]", lambda m: "[" + ",".join(m.group(1).split()).replace(",,", ",") + "]", text)


def same(name, got, want):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
    bad = np.flatnonzero(got.reshape(-1).view(np.uint8 if got.dtype == np.uint8 else np.uint32)
                         != want.reshape(-1).view(np.uint8 if want.dtype == np.uint8 else np.uint32))
    assert len(bad) == 0, f"{name}: {len(bad)} differ, first at {bad[0]}: {got.reshape(-1)[bad[0]]} vs {want.reshape(-1)[bad[0]]}"


# ---------------------------------------------------------------- the run
SPECS = [  # name, shape, group, gradient scale
    ("w64x64", (64, 64), 0, 1e-2),
    ("v5000", (5000,), 0, 1.0),
    ("n16x256", (16, 256), 1, 1e-4),
    ("b3000", (3000,), 0, 3e-3),
]


def short(t):
    """f32 of each value rounded to 3 significant decimal digits (so the file writes it short)."""
    flat = [float(f"{float(x):.2e}") for x in t.reshape(-1).tolist()]
    return torch.tensor(flat, dtype=torch.float32).reshape(t.shape)


def gradients(gen):
    """grads[step][i] as f32 tensors."""
    out = []
    for step in range(1, STEPS + 1):
        row = []
        for name, shape, _, scale in SPECS:
            g = torch.randn(shape, generator=gen) * scale
            if name == "v5000":
                g = g * torch.pow(10.0, -4.0 * torch.rand(shape, generator=gen))
                if step == 1:
                    g[768:1024] = 0.0  # a zero full block: absmax 0
                    g[4864:] = 0.0  # a zero short last block: absmax clamped to 1e-38
            if name == "w64x64" and step == 2:
                g = torch.zeros(shape)  # a zero gradient: still a step (momentum, decay)
            row.append(short(g).contiguous())
        out.append(row)
    return out


def main():
    args = [a for a in sys.argv[1:] if "=" not in a]
    opts = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
    out_path = args[0] if args else "tests/fixtures/golden/extra/adamw8bit.bnb.json"
    fix = int(opts.pop("fix_bnb_cpu_quant", 1))
    dequantized = opts.pop("dequantized", "last")
    assert dequantized in ("last", "all")
    assert not opts, f"unknown settings {opts}"
    torch.set_num_threads(1)
    replaced = fix_bnb_cpu_quant() if fix else False

    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(short(torch.randn(shape, generator=gen) * 0.5)) for _, shape, _, _ in SPECS]
    grads = gradients(gen)
    groups = [dict(params=[p for p, s in zip(params, SPECS) if s[2] == 0], weight_decay=WD),
              dict(params=[p for p, s in zip(params, SPECS) if s[2] == 1], weight_decay=0.0)]
    opt = bitsandbytes.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, optim_bits=8)
    assert type(opt).__mro__[1].__name__ == "Optimizer2State"

    records = [dict(name=name, shape=list(shape), group=group, weight_decay=[WD, 0.0][group],
                    initial=fl(p.detach().numpy()), steps=[]) for (name, shape, group, _), p in zip(SPECS, params)]
    ref = [dict(p=p.detach().numpy().copy().reshape(-1)) for p in params]
    for step in range(1, STEPS + 1):
        for p, g in zip(params, grads[step - 1]):
            p.grad = g.clone()
        opt.step()
        for i, (p, rec) in enumerate(zip(params, records)):
            st = opt.state[p]
            g = grads[step - 1][i].numpy().reshape(-1)
            pv = p.detach().numpy().reshape(-1)
            wd = rec["weight_decay"]
            r = ref[i]
            entry = dict(step=int(st["step"]), grad=fl(g), param=fl(pv))
            if st["state1"].dtype == torch.uint8:
                bits = 8
                q1, q2 = st["state1"].numpy().reshape(-1), st["state2"].numpy().reshape(-1)
                a1, a2 = st["absmax1"].numpy(), st["absmax2"].numpy()
                # the state as the next step reads it (bnb's CPU dequantize kernel)
                d1 = torch.ops.bitsandbytes.dequantize_blockwise(st["state1"], st["absmax1"], st["qmap1"], BLOCK, torch.float32).numpy().reshape(-1)
                d2 = torch.ops.bitsandbytes.dequantize_blockwise(st["state2"], st["absmax2"], st["qmap2"], BLOCK, torch.float32).numpy().reshape(-1)
                assert torch.equal(st["qmap1"], torch.from_numpy(QMAP1)) and torch.equal(st["qmap2"], torch.from_numpy(QMAP2))
                if step == 1:
                    n = len(pv)
                    blocks = -(-n // BLOCK)
                    r.update(q1=np.zeros(n, np.uint8), q2=np.zeros(n, np.uint8), a1=np.zeros(blocks, f32), a2=np.zeros(blocks, f32))
                if fix:
                    want_p, _, _, r["q1"], r["a1"], r["q2"], r["a2"] = ref_step_8bit(r["p"], g, r["q1"], r["q2"], r["a1"], r["a2"], step, wd)
                    same(f"{rec['name']} step {step} param", pv, want_p)
                    same(f"{rec['name']} step {step} state1", q1, r["q1"])
                    same(f"{rec['name']} step {step} state2", q2, r["q2"])
                    same(f"{rec['name']} step {step} absmax1", a1, r["a1"])
                    same(f"{rec['name']} step {step} absmax2", a2, r["a2"])
                same(f"{rec['name']} step {step} dequantized state1", d1, ref_dequantize(q1, a1, QMAP1))
                same(f"{rec['name']} step {step} dequantized state2", d2, ref_dequantize(q2, a2, QMAP2))
                r["p"] = pv.copy()
                entry.update(state1_codes=ints(q1), state2_codes=ints(q2), absmax1=fl(a1), absmax2=fl(a2))
                if dequantized == "all" or step == STEPS:
                    entry.update(state1=fl(d1), state2=fl(d2))
            else:
                bits = 32
                s1, s2 = st["state1"].numpy().reshape(-1), st["state2"].numpy().reshape(-1)
                if step == 1:
                    r.update(m=np.zeros_like(pv), v=np.zeros_like(pv))
                r["p"], r["m"], r["v"] = ref_step_32bit(r["p"], g, r["m"], r["v"], step, wd)
                same(f"{rec['name']} step {step} param", pv, r["p"])
                same(f"{rec['name']} step {step} state1", s1, r["m"])
                same(f"{rec['name']} step {step} state2", s2, r["v"])
                entry.update(state1=fl(s1), state2=fl(s2))
            rec["state_bits"] = bits
            rec["steps"].append(entry)

    assert [r["state_bits"] for r in records] == [8, 8, 8, 32]
    v5000 = records[1]["steps"][0]
    assert v5000["absmax1"][3] == 0.0 and v5000["absmax2"][3] == 0.0
    assert not fix or f32(v5000["absmax1"][-1]) == f32(1e-38) and f32(v5000["absmax2"][-1]) == f32(1e-38)

    data = dict(
        source="bitsandbytes.optim.AdamW(optim_bits=8) on CPU, float32 (scripts/adamw8bit_golden.py); "
               "every bnb output checked bit for bit against the script's numpy model",
        versions=dict(bitsandbytes=bitsandbytes.__version__, torch=torch.__version__, numpy=np.__version__),
        fix_bnb_cpu_quant=fix, cpu_quant_replaced_by_bnb_torch_kernel=replaced,
        dequantized_8bit_states=("every step" if dequantized == "all" else "last step only") +
        ": an 8-bit tensor's state1/state2 = qmap[codes] * absmax[i // 256] (f32), equal at every step (checked)",
        settings=dict(lr=LR, betas=list(BETAS), eps=EPS, weight_decay=WD, optim_bits=8, min_8bit_size=4096,
                      blocksize=BLOCK, steps=STEPS,
                      param_groups=[dict(weight_decay=WD, tensors=[s[0] for s in SPECS if s[2] == 0]),
                                    dict(weight_decay=0.0, tensors=[s[0] for s in SPECS if s[2] == 1])]),
        qmap1=fl(QMAP1), qmap2=fl(QMAP2),
        tensors=records,
    )
    text = compact(json.dumps(data, indent=1))
    json.loads(text)
    open(out_path, "w").write(text + "\n")
    print(out_path, len(text))


if __name__ == "__main__":
    main()

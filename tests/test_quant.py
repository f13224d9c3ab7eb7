"""hybridinfer.quant: GGUF-compatible packing (byte layout, scale choice) and error bounds."""
import numpy as np
import pytest
import torch

from hybridinfer import quant


def _gguf_q8_0_row(x: np.ndarray) -> bytes:
    """llama.cpp's quantize_row_q8_0_ref, one element at a time in float32."""
    out = b""
    for blk in x.astype(np.float32).reshape(-1, 32):
        amax = np.float32(0)
        for v in blk:
            amax = max(amax, np.float32(abs(v)))
        d = np.float32(amax / np.float32(127))
        inv = np.float32(1) / d if d != 0 else np.float32(0)
        q = []
        for v in blk:
            t = np.float32(v * inv)
            q.append(int(np.sign(t) * np.floor(abs(t) + np.float32(0.5))))  # roundf
        out += np.float16(d).tobytes() + np.array(q, np.int8).tobytes()
    return out


def _gguf_q4_0_row(x: np.ndarray) -> bytes:
    """llama.cpp's quantize_row_q4_0_ref, one element at a time in float32."""
    out = b""
    for blk in x.astype(np.float32).reshape(-1, 32):
        amax, mx = np.float32(0), np.float32(0)
        for v in blk:
            if amax < abs(v):
                amax, mx = np.float32(abs(v)), v
        d = np.float32(mx / np.float32(-8))
        inv = np.float32(1) / d if d != 0 else np.float32(0)
        qs = []
        for j in range(16):
            x0 = np.float32(blk[j] * inv)
            x1 = np.float32(blk[16 + j] * inv)
            q0 = min(15, int(np.float32(x0 + np.float32(8.5))))
            q1 = min(15, int(np.float32(x1 + np.float32(8.5))))
            qs.append(q0 | (q1 << 4))
        out += np.float16(d).tobytes() + bytes(qs)
    return out


@pytest.mark.parametrize("fmt,ref", [("q8_0", _gguf_q8_0_row), ("q4_0", _gguf_q4_0_row)])
def test_block_formats_match_llama_cpp_reference_bytes(fmt, ref):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 96, generator=g) * torch.tensor([0.01, 1.0, 30.0])[:, None]
    w[1, 40] = -7.0       # a block whose extreme is negative
    w[2, 5:9] = 0.0
    w = torch.cat([w, torch.zeros(1, 96)])  # an all-zero row: d = 0
    p = quant.pack(w, fmt)
    assert p.dtype == torch.uint8 and tuple(p.shape) == (4, quant.row_bytes(96, fmt))
    for r in range(4):
        assert bytes(p[r].numpy()) == ref(w[r].numpy()), f"row {r}"


def test_q4_0_nibble_order_and_scale():
    # Block values (j - 8) * 0.5 for j = 0..31 would need 32 levels; use the 16 levels twice.
    levels = torch.arange(32) % 16                                     # element j -> level
    w = ((levels - 8).float() * 0.25).reshape(1, 32)                   # max-abs = -2 = -8 * 0.25
    p = quant.pack(w, "q4_0")[0]
    assert np.frombuffer(bytes(p[:2].numpy()), np.float16)[0] == np.float16(0.25)
    for j in range(16):  # byte j: element j low nibble, element j + 16 high nibble
        assert int(p[2 + j]) == int(levels[j]) | (int(levels[16 + j]) << 4)
    torch.testing.assert_close(quant.unpack(p[None], "q4_0", 32), w, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_roundtrip_error_bounds(fmt):
    g = torch.Generator().manual_seed(2)
    rows, cols = 37, 320
    w = torch.randn(rows, cols, generator=g) * torch.logspace(-3, 1, rows)[:, None]
    u = quant.unpack(quant.pack(w, fmt), fmt, cols)
    assert u.dtype == torch.float32 and u.shape == w.shape
    err = (u.double() - w.double()).abs()
    if fmt == "f32":
        assert err.max() == 0
    elif fmt in ("f16", "bf16"):
        rel = 2.0 ** -11 if fmt == "f16" else 2.0 ** -8  # half an ulp, round to nearest
        sub = 2.0 ** -25 if fmt == "f16" else 0.0  # half the f16 subnormal spacing
        assert (err <= rel * w.double().abs() + sub + 1e-15).all()
    else:
        blk = w.double().reshape(rows, cols // 32, 32)
        amax = blk.abs().amax(-1, keepdim=True)
        # q8_0: |err| <= d/2 (rounding) + 127 * |d - f16(d)|, d = amax/127.
        # q4_0: |err| <= |d| (the extreme opposite to the max rounds to 7 instead of 8 levels)
        #        + 8 * |d - f16(d)|, |d| = amax/8.
        # |d - f16(d)| <= d * 2^-11, or 2^-25 where d is an f16 subnormal (tiny weights).
        d = amax / 127 if fmt == "q8_0" else amax / 8
        qmax = 127 if fmt == "q8_0" else 8
        bound = (0.5 * d if fmt == "q8_0" else d) + qmax * torch.clamp(d * 2.0 ** -11, min=2.0 ** -25)
        bound = bound * (1 + 1e-6) + 1e-15
        assert (err.reshape(rows, cols // 32, 32) <= bound).all()


def test_row_bytes_and_errors():
    assert quant.row_bytes(4096, "f32") == 16384
    assert quant.row_bytes(4096, "f16") == quant.row_bytes(4096, "bf16") == 8192
    assert quant.row_bytes(4096, "q8_0") == 128 * 34
    assert quant.row_bytes(4096, "q4_0") == 128 * 18
    assert quant.row_bytes(70, "f16") == 140
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.row_bytes(70, "q4_0")
    with pytest.raises(ValueError, match="divisible by 32"):
        quant.pack(torch.randn(2, 48), "q8_0")
    with pytest.raises(ValueError, match="unknown weight format"):
        quant.pack(torch.randn(2, 64), "q5_k")
    with pytest.raises(ValueError):
        quant.unpack(torch.zeros(2, 10, dtype=torch.uint8), "q4_0", 64)
    with pytest.raises(ValueError):
        quant.pack(torch.randn(64), "f16")


def test_numpy_input_and_f16_bf16_exact_bytes():
    w = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    assert bytes(quant.pack(w, "f16").numpy()) == w.astype(np.float16).tobytes()
    bf = torch.from_numpy(w).to(torch.bfloat16)
    assert torch.equal(quant.unpack(quant.pack(w, "bf16"), "bf16", 64), bf.float())

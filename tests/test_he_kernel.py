"""Native CKKS block multiply-accumulate (engine.kernels.ckks_block_mac) and the SEAL <-> array
conversion it needs (engine.he.raw).

The kernel is checked on every SIMD path this CPU has against the exact Python-int reference
(engine.reference.ckks_block_mac) on small rings, and against SEAL itself -- ``Evaluator.multiply``
+ ``add_inplace`` over the dimensions -- on random ciphertexts at the identify parameters, at the
level where the gallery keeps its blocks (the first data level: two 60-bit primes, N = 8192). Both
comparisons are bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import tenseal.sealapi as seal

from engine import kernels as K
from engine import reference as R
from engine.errors import InvalidParameter
from engine.he import raw
from engine.he.context import HEParams, KeyHolder, core_for
from engine.he.errors import HEFormatError, HEUnsupported

LEVELS = K.simd_levels()
Q60 = [1152921504606683137, 1152921504606748673, 1152921504606830593]  # the identify primes
Q61 = [(1 << 61) - 1, (1 << 61) - 31]  # largest accepted: the lazy sums fold every 31 dims
QSMALL = [12289, 65537, 786433]  # NTT-friendly small primes: one 30-bit digit


@pytest.fixture(params=LEVELS)
def level(request):
    K.set_simd(request.param)
    yield request.param
    K.set_simd("auto")


def _rand(rng, shape, q):
    """Uniform residues: shape (..., L, N), row l below q[l]."""
    q = np.asarray(q, dtype=np.uint64)[:, None]
    return rng.integers(0, 1 << 63, shape, dtype=np.uint64) % q


def _top(shape, q):
    """Every coefficient q - 1: the largest products, the worst case of the lazy reduction."""
    return np.broadcast_to(np.asarray(q, dtype=np.uint64)[:, None] - 1, shape).copy()


# ------------------------------------------------------------------------------------------
# against the exact reference
@pytest.mark.parametrize("dims", [1, 3, 4, 5, 128, 129])
@pytest.mark.parametrize("q,n", [(Q60[:2], 64), (Q60[:1], 200), (Q60, 24), (Q61, 40), (QSMALL, 30),
                                 (Q60[:2], 13)])  # n % 8 and n % 4 != 0: the vector tiles' tails
def test_matches_reference(level, dims, q, n):
    rng = np.random.default_rng(dims * 1000 + n)
    shape = (dims, 2, len(q), n)
    probe = _rand(rng, shape, q)
    blocks = [_rand(rng, shape, q), _top(shape, q), _rand(rng, shape, q)]
    for p in (probe, _top(shape, q)):
        got = K.ckks_block_mac(blocks, p, q)
        assert got.dtype == np.uint64 and got.shape == (3, 3, len(q), n)
        np.testing.assert_array_equal(got, R.ckks_block_mac(blocks, p, q))


@pytest.mark.parametrize("dims", [3, 130])
def test_identify_ring_size_matches_reference(level, dims):
    # L * N = 2 * 8192 takes the compile-time specialised tile of the kernel
    rng = np.random.default_rng(dims)
    shape = (dims, 2, 2, 8192)
    probe, block = _rand(rng, shape, Q60[:2]), _top(shape, Q60[:2])
    block[:, :, :, ::3] = _rand(rng, shape, Q60[:2])[:, :, :, ::3]
    np.testing.assert_array_equal(K.ckks_block_mac([block], probe, Q60[:2]),
                                  R.ckks_block_mac([block], probe, Q60[:2]))


@pytest.mark.parametrize("n_threads", [1, 2, 3, 0])
def test_many_blocks_threads_and_out(level, n_threads):
    rng = np.random.default_rng(n_threads)
    shape = (7, 2, 2, 300)
    probe = _rand(rng, shape, Q60[:2])
    stacked = np.stack([_rand(rng, shape, Q60[:2]) for _ in range(9)])
    want = R.ckks_block_mac(list(stacked), probe, Q60[:2])
    np.testing.assert_array_equal(K.ckks_block_mac(stacked, probe, Q60[:2], n_threads=n_threads), want)
    out = np.full((9, 3, 2, 300), 7, dtype=np.uint64)
    res = K.ckks_block_mac(list(stacked), probe, Q60[:2], out=out, n_threads=n_threads)
    assert res is out or np.shares_memory(res, out)
    np.testing.assert_array_equal(out, want)


def test_concurrent_calls():
    # several Python threads at once (the GIL is released; the pool is shared or bypassed)
    import threading
    rng = np.random.default_rng(8)
    shape = (5, 2, 2, 1024)
    probes = [_rand(rng, shape, Q60[:2]) for _ in range(4)]
    blocks = [_rand(rng, shape, Q60[:2]) for _ in range(3)]
    want = [R.ckks_block_mac(blocks, p, Q60[:2]) for p in probes]
    got = [None] * len(probes)

    def work(t):
        for _ in range(3):
            got[t] = K.ckks_block_mac(blocks, probes[t], Q60[:2], n_threads=2)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(len(probes))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


def test_no_blocks():
    probe = np.zeros((2, 2, 1, 8), np.uint64)
    assert K.ckks_block_mac([], probe, Q60[:1]).shape == (0, 3, 1, 8)


# ------------------------------------------------------------------------------------------
# against SEAL
@pytest.fixture(scope="module")
def seal_env():
    core = core_for(HEParams.for_mode("identify", 128))
    pid = core.ctx.first_parms_id()  # the level of the gallery's blocks and the expanded probe
    return core, pid, raw.moduli(core.ctx, pid)


def _seal_mac(core, probe_cts, block_cts):
    ev, acc, tmp = core.evaluator, seal.Ciphertext(), seal.Ciphertext()
    ev.multiply(probe_cts[0], block_cts[0], acc)
    for p, b in zip(probe_cts[1:], block_cts[1:]):
        ev.multiply(p, b, tmp)
        ev.add_inplace(acc, tmp)
    return acc


@pytest.mark.parametrize("dims", [1, 3, 128, 129, 512])
def test_bit_equal_to_seal_multiply_add(seal_env, dims):
    core, pid, q = seal_env
    rng = np.random.default_rng(dims)
    n = core.params.poly_degree
    probe = _rand(rng, (dims, 2, 2, n), q)
    blocks = [_rand(rng, (dims, 2, 2, n), q), _top((dims, 2, 2, n), q)]
    scale = 2.0 ** 45
    probe_cts = [raw.from_array(p, core.ctx, pid, scale) for p in probe]
    want = []
    for blk in blocks:
        acc = _seal_mac(core, probe_cts, [raw.from_array(b, core.ctx, pid, scale) for b in blk])
        assert acc.size() == 3 and acc.is_ntt_form() and list(acc.parms_id()) == list(pid)
        want.append(raw.to_array(acc))
    for lvl in LEVELS:
        K.set_simd(lvl)
        try:
            got = K.ckks_block_mac(blocks, probe, q, n_threads=2)
        finally:
            K.set_simd("auto")
        for b in range(len(blocks)):
            np.testing.assert_array_equal(got[b], want[b], err_msg=f"{lvl}, block {b}")


def test_real_encryptions_decrypt_like_seal(seal_env):
    # real ciphertexts (public-key encryption of the gallery layout), and the product rebuilt as
    # a SEAL ciphertext: same bits, so rescale + relinearise + decrypt give SEAL's scores
    core, pid, q = seal_env
    kh = KeyHolder("identify", 4)
    pc = kh.public_context()
    rng = np.random.default_rng(5)
    emb = rng.standard_normal((6, 4))
    block_cts = pc.encrypt_block(emb)
    probe_cts = pc.encrypt_block(np.repeat(emb[2:3], 1, axis=0))
    block, probe = raw.to_arrays(block_cts), raw.to_arrays(probe_cts)
    ctx, pid = pc.core.ctx, block_cts[0].parms_id()
    got = K.ckks_block_mac([block], probe, raw.moduli(ctx, pid))[0]
    want = _seal_mac(pc.core, probe_cts, block_cts)
    np.testing.assert_array_equal(got, raw.to_array(want))
    rebuilt = raw.from_array(got, ctx, pid, want.scale)
    assert rebuilt.scale == want.scale and list(rebuilt.parms_id()) == list(want.parms_id())
    np.testing.assert_array_equal(raw.to_array(rebuilt), raw.to_array(want))


# ------------------------------------------------------------------------------------------
# bad input: InvalidParameter from Python, ValueError from the native boundary, never a crash
def _ok(dims=2, limbs=2, n=8):
    return np.zeros((dims, 2, limbs, n), np.uint64)


@pytest.mark.parametrize("call", [
    lambda: K.ckks_block_mac([_ok()], _ok().astype(np.int64), Q60[:2]),              # dtype
    lambda: K.ckks_block_mac([_ok().astype(np.uint32)], _ok(), Q60[:2]),
    lambda: K.ckks_block_mac([_ok()], _ok()[0], Q60[:2]),                            # ndim
    lambda: K.ckks_block_mac([_ok()], np.zeros((2, 3, 2, 8), np.uint64), Q60[:2]),   # 3 polys
    lambda: K.ckks_block_mac([_ok(dims=3)], _ok(), Q60[:2]),                         # shapes
    lambda: K.ckks_block_mac([_ok(n=16)], _ok(), Q60[:2]),
    lambda: K.ckks_block_mac([_ok()], _ok(), Q60[:1]),                               # moduli
    lambda: K.ckks_block_mac([_ok()], _ok(), [Q60[0], 1 << 40]),                     # even
    lambda: K.ckks_block_mac([_ok()], _ok(), [Q60[0], 1 << 61 | 1]),                 # >= 2^61
    lambda: K.ckks_block_mac([_ok()], _ok(), [Q60[0], -3]),
    lambda: K.ckks_block_mac([_ok()], _ok(), ["x", 3]),
    lambda: K.ckks_block_mac([_ok()], np.zeros((2, 2, 2, 16), np.uint64)[..., ::2], Q60[:2]),
    lambda: K.ckks_block_mac([_ok()], _ok(), Q60[:2], out=np.zeros((1, 3, 2, 8), np.int64)),
    lambda: K.ckks_block_mac([_ok()], _ok(), Q60[:2], out=np.zeros((2, 3, 2, 8), np.uint64)),
    lambda: K.ckks_block_mac([_ok()], _ok(), Q60[:2], n_threads=-1),
    lambda: K.ckks_block_mac(["block"], _ok(), Q60[:2]),
])
def test_bad_input_raises(call):
    with pytest.raises(InvalidParameter):
        call()


def test_native_defensive_checks():
    from engine import _kernels as N
    q = np.array(Q60[:2], np.uint64)
    bad = [
        lambda: N.ckks_block_mac([_ok()], _ok(), q[:1]),
        lambda: N.ckks_block_mac([_ok()], _ok(), np.array([Q60[0], 4], np.uint64)),
        lambda: N.ckks_block_mac([_ok()], _ok(), np.array([Q60[0], 1], np.uint64)),
        lambda: N.ckks_block_mac([_ok()], _ok(), q.astype(np.int64)),
        lambda: N.ckks_block_mac([_ok()], _ok().astype(np.int64), q),
        lambda: N.ckks_block_mac([_ok()], np.zeros((2, 2, 2, 16), np.uint64)[..., ::2], q),
        lambda: N.ckks_block_mac([_ok(n=4)], _ok(), q),
        lambda: N.ckks_block_mac([np.zeros(3)], _ok(), q),
        lambda: N.ckks_block_mac([1], _ok(), q),
        lambda: N.ckks_block_mac([_ok()], _ok(), q, np.zeros((1, 3, 2, 4), np.uint64)),
        lambda: N.ckks_block_mac([_ok()], _ok(), q, np.zeros((1, 3, 2, 8), np.uint64)[:, ::-1]),
        lambda: N.ckks_max_excess(np.zeros(8, np.uint64), q),
        lambda: N.ckks_max_excess(np.zeros((3, 8), np.uint64), q),
    ]
    for call in bad:
        with pytest.raises(ValueError):
            call()


def test_out_must_not_overlap_the_inputs():
    # it would be overwritten while other threads still read it
    from engine import _kernels as N
    q = np.array(Q60[:2], np.uint64)
    buf = np.zeros(200, np.uint64)
    block, probe = buf[:64].reshape(2, 2, 2, 8), buf[100:164].reshape(2, 2, 2, 8)
    for out in (buf[40:88].reshape(1, 3, 2, 8), buf[150:198].reshape(1, 3, 2, 8)):
        with pytest.raises(ValueError, match="overlap"):
            N.ckks_block_mac([block], probe, q, out)
    N.ckks_block_mac([block], probe, q, np.zeros((1, 3, 2, 8), np.uint64))  # a separate out is fine


def test_max_excess():
    q = np.array(Q60[:2], np.uint64)
    a = _rand(np.random.default_rng(0), (4, 2, 2, 16), q)
    assert K.ckks_max_excess(a, q) == 0
    a[3, 1, 1, 5] = q[1] + 9
    assert K.ckks_max_excess(a, q) == 10
    a[0, 0, 0, 0] = np.uint64(2**64 - 1)
    assert K.ckks_max_excess(a, q) == 2**64 - int(q[0])
    with pytest.raises(InvalidParameter):
        K.ckks_max_excess(a.astype(np.int64), q)
    with pytest.raises(InvalidParameter):
        K.ckks_max_excess(a, q[:1])


def test_aligned_empty():
    for shape in [(3, 2, 2, 8), (1,), (0, 5)]:
        a = K.aligned_empty(shape)
        assert a.shape == shape and a.dtype == np.uint64 and a.flags.c_contiguous
        assert a.size == 0 or a.ctypes.data % 64 == 0


# ------------------------------------------------------------------------------------------
# engine.he.raw
def test_raw_round_trip(seal_env):
    core, pid, q = seal_env
    kh = KeyHolder("identify", 8)
    pc = kh.public_context()
    ct = pc.encrypt_block(np.random.default_rng(1).standard_normal((3, 8)))[0]
    ctx = pc.core.ctx
    a = raw.to_array(ct)
    assert a.shape == (2, 2, 8192) and a.dtype == np.uint64
    np.testing.assert_array_equal(a, raw.to_array(ct, direct=False))  # fast path == layout-free path
    assert K.ckks_max_excess(a, raw.moduli(ctx, ct.parms_id())) == 0
    back = raw.from_array(a, ctx, ct.parms_id(), ct.scale)
    assert back.is_ntt_form() and back.scale == ct.scale and list(back.parms_id()) == list(ct.parms_id())
    np.testing.assert_array_equal(raw.to_array(back), a)
    # the rebuilt ciphertext decrypts like the original
    np.testing.assert_allclose(kh._decrypt_coeffs(back), kh._decrypt_coeffs(ct), atol=0)
    out = np.empty_like(a)
    assert raw.to_array(ct, out) is out
    stacked = raw.to_arrays([ct, back])
    assert stacked.shape == (2, 2, 2, 8192)
    np.testing.assert_array_equal(stacked[0], stacked[1])


def test_raw_size3_and_lower_level(seal_env):
    core, pid, q = seal_env
    rng = np.random.default_rng(2)
    a3 = _rand(rng, (3, 2, core.params.poly_degree), q)
    ct3 = raw.from_array(a3, core.ctx, pid, 2.0 ** 90)
    assert raw.shape_of(ct3) == (3, 2, 8192)
    np.testing.assert_array_equal(raw.to_array(ct3), a3)
    last = core.ctx.last_parms_id()
    q1 = raw.moduli(core.ctx, last)
    a1 = _rand(rng, (2, 1, core.params.poly_degree), q1)
    np.testing.assert_array_equal(raw.to_array(raw.from_array(a1, core.ctx, last, 2.0 ** 30)), a1)


def test_raw_rejects_bad_arrays(seal_env):
    core, pid, q = seal_env
    n = core.params.poly_degree
    good = _rand(np.random.default_rng(3), (2, 2, n), q)
    unreduced = good.copy()
    unreduced[1, 0, 7] = q[0]
    with pytest.raises(HEFormatError):
        raw.from_array(unreduced, core.ctx, pid, 1.0)
    with pytest.raises(HEFormatError):  # three primes' worth of data at a two-prime level
        raw.from_array(_rand(np.random.default_rng(4), (2, 3, n), list(q) + [Q60[2]]), core.ctx, pid, 1.0)
    with pytest.raises(HEUnsupported):
        raw.from_array(good.astype(np.int64), core.ctx, pid, 1.0)
    with pytest.raises(HEUnsupported):
        raw.moduli(core.ctx, [1, 2, 3, 4])
    ct = raw.from_array(good, core.ctx, pid, 1.0)
    with pytest.raises(HEUnsupported):
        raw.to_array(ct, np.empty((2, 2, n), np.int64))
    with pytest.raises(HEUnsupported):
        raw.to_arrays([ct, raw.from_array(good[:, :1], core.ctx, core.ctx.last_parms_id(), 1.0)])


def test_from_array_into_reuses_a_ciphertext(seal_env):
    # the search loop refills one SEAL ciphertext per block instead of a serialised load
    core, pid, q = seal_env
    rng = np.random.default_rng(6)
    n = core.params.poly_degree
    a3, a2 = _rand(rng, (3, 2, n), q), _rand(rng, (2, 2, n), q)
    ct = raw.from_array(a3, core.ctx, pid, 2.0 ** 90)
    last = core.ctx.last_parms_id()
    core.evaluator.rescale_to_next_inplace(ct)              # now elsewhere: another level and scale
    again = raw.from_array(a2, core.ctx, pid, 2.0 ** 45, into=ct)
    assert again is ct and raw.shape_of(ct) == (2, 2, n) and ct.scale == 2.0 ** 45
    assert list(ct.parms_id()) == list(pid) and ct.is_ntt_form()
    np.testing.assert_array_equal(raw.to_array(ct), a2)
    assert raw.serialise(a2, pid, 2.0 ** 45) == raw.ciphertext_bytes(ct)
    np.testing.assert_array_equal(raw.to_array(raw.from_array(a2, core.ctx, pid, 2.0 ** 45)), a2)
    unreduced = a2.copy()
    unreduced[0, 1, 3] = q[1]
    with pytest.raises(HEFormatError):
        raw.from_array(unreduced, core.ctx, pid, 1.0, into=ct)
    with pytest.raises(HEFormatError):                       # three primes at a two-prime level
        raw.from_array(_rand(rng, (2, 3, n), list(q) + [Q60[2]]), core.ctx, pid, 1.0, into=ct)
    a1 = _rand(rng, (2, 1, n), raw.moduli(core.ctx, last))
    np.testing.assert_array_equal(raw.to_array(raw.from_array(a1, core.ctx, last, 1.0, into=ct)), a1)
    # a ciphertext of the other NTT form is not reused (SEAL's own load builds a new one)
    other = raw.from_array(a2, core.ctx, pid, 1.0, ntt_form=False)
    got = raw.from_array(a2, core.ctx, pid, 1.0, into=other)
    assert got is not other and got.is_ntt_form()


def test_sealio_raw_ciphertext_is_from_array(seal_env):
    from engine.he.sealio import raw_ciphertext
    core, pid, q = seal_env
    a = _rand(np.random.default_rng(7), (2, 2, core.params.poly_degree), q)
    ct = raw_ciphertext(core.ctx, pid, a, 2.0 ** 45)
    np.testing.assert_array_equal(raw.to_array(ct), a)
    a[0, 0, 0] = q[0]
    with pytest.raises(HEUnsupported):
        raw_ciphertext(core.ctx, pid, a, 2.0 ** 45)

"""The id hash: pinned bits, any int64 id, range, determinism, independence of features/seeds/k."""

from __future__ import annotations

import pytest
import torch

from embeddings.hashing import (
    hash64,
    hash_to_range,
    identity_to_range,
    logical_right_shift,
    mix64,
    unsigned_mod,
)

_M = (1 << 64) - 1


# ---- independent pure-Python implementation (Python ints, explicit masking) ----------------------
def _py_mix(x: int) -> int:
    z = (x + 0x9E3779B97F4A7C15) & _M
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M
    return z ^ (z >> 31)


def _py_hash64(x: int, feature: int, seed: int, k: int) -> int:
    salt = _py_mix((_py_mix((_py_mix(seed & _M) + feature) & _M) + k) & _M)
    return _py_mix((x & _M) ^ salt)  # unsigned 64-bit value


def _py_hash_to_range(x: int, feature: int, seed: int, k: int, n: int) -> int:
    return _py_hash64(x, feature, seed, k) % n


def _to_signed(u: int) -> int:
    return u - (1 << 64) if u >= (1 << 63) else u


IDS = [0, 1, -1, 2, 7, 255, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 1, 2**40 + 7,
       -(2**40), 2**62, 2**63 - 1, -(2**63), -(2**63) + 1, 123456789, -987654321, 0x1234567890ABCDEF]


def test_mix64_matches_published_splitmix64_first_output() -> None:
    # splitmix64 seeded with 0 outputs 0xE220A8397B1DCDAF first (Vigna's reference implementation).
    assert int(mix64(torch.tensor([0]))[0]) == _to_signed(0xE220A8397B1DCDAF)


# (id, feature, seed, k, num_buckets) -> bucket, computed once with the pure-Python mix above.
GOLDEN = [
    ((0, 0, 0, 0, 1000003), 177408),
    ((1, 0, 0, 0, 1000003), 392021),
    ((-1, 3, 42, 1, 75000), 26401),
    ((2**40 + 7, 25, 7, 2, 2**20), 281291),
    ((-(2**63), 1, 1, 3, 97), 26),
    ((2**63 - 1, 2, 123456789, 0, 2**62), 638637424715960271),
    ((12345, 0, 0, 1, 10), 6),
]


@pytest.mark.parametrize("args,expected", GOLDEN)
def test_golden_values(args: tuple, expected: int) -> None:
    x, feature, seed, k, n = args
    assert _py_hash_to_range(x, feature, seed, k, n) == expected  # the reference itself is pinned
    assert int(hash_to_range(torch.tensor([x]), feature, seed, k, n)[0]) == expected


@pytest.mark.parametrize("feature,seed,k", [(0, 0, 0), (3, 42, 1), (25, 2**62 + 11, 17)])
@pytest.mark.parametrize("n", [1, 2, 10, 75000, 1000003, 2**31 + 11, 2**62])
def test_matches_pure_python_on_extreme_ids(feature: int, seed: int, k: int, n: int) -> None:
    ids = torch.tensor(IDS, dtype=torch.int64)
    got = hash_to_range(ids, feature, seed, k, n).tolist()
    assert got == [_py_hash_to_range(x, feature, seed, k, n) for x in IDS]
    full = hash64(ids, feature, seed, k).tolist()
    assert full == [_to_signed(_py_hash64(x, feature, seed, k)) for x in IDS]


def test_tensor_features_broadcast_like_scalars() -> None:
    ids = torch.tensor(IDS)
    features = torch.arange(len(IDS)) % 5
    got = hash_to_range(ids, features, 9, 3, 1000)
    expected = [_py_hash_to_range(x, int(f), 9, 3, 1000) for x, f in zip(IDS, features)]
    assert got.tolist() == expected


def test_range_dtype_and_determinism() -> None:
    ids = torch.randint(-(2**62), 2**62, (5000,), generator=torch.Generator().manual_seed(0))
    a = hash_to_range(ids, 1, 2, 3, 777)
    b = hash_to_range(ids.clone(), 1, 2, 3, 777)
    assert a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) < 777
    assert torch.equal(a, b)
    small = torch.arange(-500, 500, dtype=torch.int32)
    assert torch.equal(hash_to_range(small, 1, 2, 3, 777), hash_to_range(small.long(), 1, 2, 3, 777))


def test_high_bits_matter() -> None:
    # ids equal in their low 16 / 32 bits must not collide systematically (the released encoder's defect)
    base = torch.arange(1000, dtype=torch.int64)
    a = hash_to_range(base, 0, 0, 0, 2**40)
    for shift in (16, 32, 48):
        b = hash_to_range(base + (1 << shift), 0, 0, 0, 2**40)
        assert int((a == b).sum()) == 0


@pytest.mark.parametrize("other", [dict(feature=1), dict(seed=1), dict(k=1)])
def test_features_seeds_and_hash_indices_give_different_hashes(other: dict) -> None:
    ids = torch.arange(-5000, 5000, dtype=torch.int64)
    base = dict(feature=0, seed=0, k=0)
    a = hash_to_range(ids, base["feature"], base["seed"], base["k"], 2**20)
    changed = {**base, **other}
    b = hash_to_range(ids, changed["feature"], changed["seed"], changed["k"], 2**20)
    assert float((a == b).float().mean()) < 0.001  # independent hashes agree with prob 2**-20


def test_buckets_roughly_uniform_on_sequential_ids() -> None:
    counts = torch.bincount(hash_to_range(torch.arange(100_000), 0, 0, 0, 10), minlength=10)
    assert int(counts.min()) > 9_500 and int(counts.max()) < 10_500


def test_logical_right_shift_and_unsigned_mod_on_negative_values() -> None:
    values = [-1, -(2**63), -12345, 2**63 - 1, 0, 77]
    t = torch.tensor(values)
    for s in (1, 27, 30, 31, 63):
        assert logical_right_shift(t, s).tolist() == [(v & _M) >> s for v in values]
    for n in (1, 3, 10, 2**33 + 1, 2**62):
        assert unsigned_mod(t, n).tolist() == [(v & _M) % n for v in values]


def test_identity_to_range_is_non_negative_modulo() -> None:
    t = torch.tensor([-7, -1, 0, 3, 10, 2**40])
    assert identity_to_range(t, 10).tolist() == [3, 9, 0, 3, 0, (2**40) % 10]


def test_bad_arguments_raise() -> None:
    with pytest.raises(TypeError, match="integer"):
        hash_to_range(torch.tensor([1.0]), 0, 0, 0, 10)
    with pytest.raises(ValueError, match="num_buckets"):
        hash_to_range(torch.tensor([1]), 0, 0, 0, 0)
    with pytest.raises(ValueError, match="num_buckets"):
        hash_to_range(torch.tensor([1]), 0, 0, 0, 2**62 + 1)
    with pytest.raises(ValueError, match="shift"):
        logical_right_shift(torch.tensor([1]), 64)

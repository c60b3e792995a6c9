from __future__ import annotations

import hashlib

from keen_stream.dal.tokens import PREFIXES, hash_token, looks_like_token, new_token


def test_new_tokens_are_unique_prefixed_and_256_bit() -> None:
    tokens = {new_token("session") for _ in range(1000)}
    assert len(tokens) == 1000
    for token in tokens:
        assert token.startswith(PREFIXES["session"])
        assert len(token) - len(PREFIXES["session"]) == 43  # 32 bytes, base64url, unpadded
        assert looks_like_token(token)


def test_hash_is_sha256_hex() -> None:
    assert hash_token("ks_api_x") == hashlib.sha256(b"ks_api_x").hexdigest()


def test_shape_check_rejects_garbage_without_the_database() -> None:
    for bad in (None, 5, "", "bearer abc", "ks_xyz_abc", "ks_api_" + "a" * 200, "ks_api_\u00e9"):
        assert not looks_like_token(bad)

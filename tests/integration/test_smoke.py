from keen_stream.dal.database import KeenDatabase


async def test_user_roundtrip(db: KeenDatabase, alice, admin) -> None:
    got = await db.users.get(alice.id)
    assert got.email == "alice@example.com"
    user = await db.users.authenticate(
        "ALICE@example.com", "correct horse battery staple", ip="10.0.0.1"
    )
    assert user.last_login_at is not None
    issued = await db.tokens.issue(alice.id, "session", scopes=["stream"])
    info = await db.tokens.validate(issued.token.get_secret_value(), scopes=["stream"])
    assert info.user_id == alice.id
    assert admin.is_admin

import pytest

from app.auth import LOCAL_USER, AuthError, AuthService, hash_password, verify_password


def test_hashing_is_argon2id_and_salted():
    h1, h2 = hash_password("correct horse"), hash_password("correct horse")
    assert h1.startswith("$argon2id$") and h1 != h2
    assert verify_password(h1, "correct horse") and not verify_password(h1, "wrong")
    assert not verify_password(None, "anything") and not verify_password("garbage", "x")


def test_users_add_list_remove_and_login(ctx):
    auth: AuthService = ctx.auth
    assert not auth.has_accounts()
    assert auth.resolve(None).username == LOCAL_USER  # single-user mode
    auth.add_user("alice", "alice-password-1", is_admin=True)
    assert auth.has_accounts()
    with pytest.raises(AuthError, match="login required"):
        auth.resolve(None)
    assert [u.username for u in auth.list_users()] == ["alice"]  # `local` has no password: not listed
    assert auth.check_login("alice", "alice-password-1")
    assert not auth.check_login("alice", "nope-nope-nope")
    assert not auth.check_login("nobody", "alice-password-1")
    assert not auth.check_login(LOCAL_USER, "")
    with pytest.raises(AuthError, match="already exists"):
        auth.add_user("alice", "another-password")
    with pytest.raises(AuthError, match="too short"):
        auth.add_user("bob", "short")
    with pytest.raises(AuthError, match="invalid username"):
        auth.add_user("bad name", "long-enough-password")
    auth.set_password("alice", "new-password-2")
    assert auth.check_login("alice", "new-password-2") and not auth.check_login("alice", "alice-password-1")
    auth.remove_user("alice")
    assert auth.list_users() == [] and not auth.check_login("alice", "new-password-2")
    with pytest.raises(AuthError, match="no such user"):
        auth.remove_user("alice")


def test_first_run_admin(ctx):
    ctx.auth.ensure_admin("admin", None)
    assert not ctx.auth.has_accounts()
    ctx.auth.ensure_admin("admin", "admin-password-1")
    assert ctx.auth.get("admin").is_admin and ctx.auth.check_login("admin", "admin-password-1")
    ctx.auth.ensure_admin("admin", "other-password-1")  # accounts exist: no-op
    assert ctx.auth.check_login("admin", "admin-password-1")

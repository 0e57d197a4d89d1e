"""`sepen-admin`: migrate, create-key (the printed key authenticates), list-keys, revoke-key; a database that was
never migrated gets "run migrate first", not a traceback; settings from SEPEN_* variables."""

from __future__ import annotations

from sepen_store.auth import authenticate
from service.admin import main


def test_migrate_create_and_revoke_a_key(pg_url, db, monkeypatch, capsys, client):
    monkeypatch.setenv("SEPEN_DATABASE_URL", pg_url)
    assert main(["migrate"]) == 0  # already at head: a no-op

    assert main(["create-key", "--tenant", "acme", "--name", "ci"]) == 0
    key = capsys.readouterr().out.strip()
    assert key.startswith("sk_sepen_")
    assert authenticate(db, key) == "acme"
    assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200

    assert main(["list-keys", "--tenant", "acme"]) == 0
    listed = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [key[:15], "acme", "ci"] in [row[:3] for row in listed] and all(key not in row for row in listed)
    assert main(["revoke-key", key[:15]]) == 0
    assert client.get("/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    main(["list-keys", "--tenant", "acme"])
    assert any(row.startswith(key[:15]) and "\trevoked " in row for row in capsys.readouterr().out.splitlines())


def test_commands_on_a_database_never_migrated_say_run_migrate_first(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SEPEN_DATA_DIR", str(tmp_path))  # the embedded default: an SQLite file not made yet
    monkeypatch.delenv("SEPEN_DATABASE_URL", raising=False)
    for command in (["create-key", "--tenant", "acme"], ["list-keys"], ["revoke-key", "sk_sepen_abcdef"]):
        assert main(command) == 2
        error = capsys.readouterr().err
        assert "has no sepen tables: run `sepen-admin migrate` first" in error and "Traceback" not in error
    assert main(["migrate"]) == 0 and main(["create-key", "--tenant", "acme"]) == 0


def test_create_key_refuses_a_bad_tenant(pg_url, monkeypatch, capsys):
    monkeypatch.setenv("SEPEN_DATABASE_URL", pg_url)
    assert main(["create-key", "--tenant", "x" * 65]) == 2
    assert "tenant" in capsys.readouterr().err


def test_create_and_revoke_refuse_values_the_database_cannot_hold(pg_url, monkeypatch, capsys):
    monkeypatch.setenv("SEPEN_DATABASE_URL", pg_url)
    for tenant in ("a\x00b", "new\nline", " acme"):
        assert main(["create-key", "--tenant", tenant]) == 2
        assert "tenant" in capsys.readouterr().err
    assert main(["create-key", "--tenant", "acme", "--name", "n" * 129]) == 2
    assert main(["revoke-key", "sk_sepen_\x00"]) == 1  # matches nothing, and the query is never sent
    assert "revoked 0" in capsys.readouterr().err


def test_webhook_key_prints_the_tenants_signing_key(monkeypatch, capsys):
    from sepen_store.webhooks import tenant_key

    monkeypatch.delenv("SEPEN_WEBHOOK_SECRET", raising=False)
    assert main(["webhook-key", "--tenant", "acme"]) == 2
    assert "SEPEN_WEBHOOK_SECRET is not set" in capsys.readouterr().err
    monkeypatch.setenv("SEPEN_WEBHOOK_SECRET", "s" * 32)
    assert main(["webhook-key", "--tenant", "acme"]) == 0
    assert capsys.readouterr().out.strip() == tenant_key("s" * 32, "acme") != tenant_key("s" * 32, "globex")

"""`sepen-admin`: migrate the database (and create the object store's bucket), create, list and revoke API keys, print a
tenant's webhook signing key, apply the retention of images and checkpoints (settings from SEPEN_* variables)."""

from __future__ import annotations

import argparse
import sys

from sepen_core.extras import require, version


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sepen-admin", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "migrate", help="apply the database migrations, and create the bucket of SEPEN_BLOB_BACKEND=s3 (safe to repeat)"
    )
    create = sub.add_parser("create-key", help="create an API key for a tenant and print it (it is shown only once)")
    create.add_argument("--tenant", required=True, help="the tenant the key acts for (1-64 characters)")
    create.add_argument("--name", default="", help="a label for the key, e.g. who holds it")
    listing = sub.add_parser("list-keys", help="list the keys: prefix, tenant, name, created, revoked (never the key)")
    listing.add_argument("--tenant", help="only this tenant's keys")
    revoke = sub.add_parser("revoke-key", help="revoke the keys that start with PREFIX (as list-keys shows it)")
    revoke.add_argument("prefix", help="the key's first characters, e.g. sk_sepen_Ab12Cd")
    webhook = sub.add_parser(
        "webhook-key", help="print the key a tenant's webhook deliveries are signed with (from SEPEN_WEBHOOK_SECRET)"
    )
    webhook.add_argument("--tenant", required=True)
    sub.add_parser(
        "retention",
        help="delete the images and checkpoints past SEPEN_IMAGE_RETENTION_DAYS and SEPEN_CHECKPOINT_RETENTION_DAYS "
        "now (the workers do it every SEPEN_RETENTION_INTERVAL_S); adapters are never deleted",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    require("sepen-admin", "api", part="store")  # before the imports the store extra brings
    from sepen_store.auth import create_api_key, list_api_keys, revoke_api_key
    from sepen_store.database import make_engine, schema_status, session_factory, upgrade_database
    from sepen_store.errors import StorageRefused, StorageUnavailable
    from sepen_store.object_store import object_store_for
    from sepen_store.retention import apply_retention
    from sepen_store.settings import Settings, WorkerSettings

    if args.command == "webhook-key":
        from sepen_store.webhooks import tenant_key

        secret = WorkerSettings.from_env().webhook_secret
        if not secret:
            print("sepen-admin: SEPEN_WEBHOOK_SECRET is not set: this service signs no webhooks", file=sys.stderr)
            return 2
        print(tenant_key(secret, args.tenant))
        return 0
    settings = WorkerSettings.from_env() if args.command == "retention" else Settings.from_env()
    blobs = object_store_for(settings) if args.command in ("migrate", "retention") else None
    if args.command == "migrate":
        upgrade_database(settings.database_url)
        print("database is at the latest schema", file=sys.stderr)
        if blobs is not None:
            try:
                created = blobs.ensure_bucket(wait_s=60.0)
            except (StorageUnavailable, StorageRefused) as exc:
                print(f"sepen-admin: {exc}", file=sys.stderr)
                return 2
            print(f"object store: {blobs.where} {'created' if created else 'is there'}", file=sys.stderr)
        return 0
    engine = make_engine(settings.database_url)
    try:
        problem = schema_status(engine)
        if problem:
            print(f"sepen-admin: {problem}", file=sys.stderr)
            return 2
        with session_factory(engine, blobs=blobs)() as session:
            if args.command == "retention":
                removed = apply_retention(
                    session,
                    image_days=settings.image_retention_days,
                    checkpoint_days=settings.checkpoint_retention_days,
                )
                print(f"deleted {removed.images} image(s) and {removed.checkpoints} checkpoint(s)", file=sys.stderr)
            elif args.command == "create-key":
                try:
                    key = create_api_key(session, args.tenant, args.name)
                except ValueError as exc:
                    print(f"sepen-admin: {exc}", file=sys.stderr)
                    return 2
                print(key)
            elif args.command == "list-keys":
                for key in list_api_keys(session, args.tenant):
                    revoked = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
                    print(f"{key.prefix}\t{key.tenant}\t{key.name or '-'}\t{key.created_at:%Y-%m-%d %H:%M}\t{revoked}")
            else:
                count = revoke_api_key(session, args.prefix)
                print(f"revoked {count} key(s)", file=sys.stderr)
                return 0 if count else 1
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`llamaship builds gc`: remove builds no alias references (keeping the newest per model) and the
blobs nothing uses, from the store the services use (a directory or s3://). See shared.store_gc."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict

from shared import config

NAMES = (*config.REDIS, *config.STORE)


def add_parser(builds_sub) -> None:
    p = builds_sub.add_parser(
        "gc", help="remove builds no alias references and blobs nothing uses",
        description="Remove builds that no model alias references, keeping the newest --keep per model and "
                    "every build published within --grace-s, then the stored blobs no build uses. Builds a "
                    "replica is loading (a lease in S3) or serving from this machine's cache (a pin) are left alone.")
    config.add_arguments(p, NAMES)
    p.add_argument("--keep", type=int, default=3, help="newest builds kept per model besides referenced ones (default 3)")
    p.add_argument("--grace-s", type=float, default=3600.0,
                   help="builds and blobs younger than this are kept: a publish in progress (default 3600)")
    p.add_argument("--dry-run", action="store_true", help="report what would be removed; remove nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_builds_gc)


async def _referenced(settings: config.Settings) -> set[str]:
    from shared import catalog, redis_conn

    r = redis_conn.connect(settings)
    try:
        return {a.build_id for a in await catalog.list_aliases(r)}
    finally:
        await r.aclose()


def cmd_builds_gc(args: argparse.Namespace) -> int:
    from shared.store import StoreError, open_store
    from shared.store_gc import collect

    if args.keep < 0 or args.grace_s < 0:
        print("llamaship: --keep and --grace-s must be >= 0", file=sys.stderr)
        return 2
    try:
        settings = config.resolve(NAMES, args)
        referenced = asyncio.run(_referenced(settings))
        store = open_store(settings).ensure()
        report = collect(store, referenced, args.keep, args.grace_s, args.dry_run)
    except (config.ConfigError, StoreError, OSError) as exc:
        print(f"llamaship: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(report), indent=2))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"store {store.describe()}: kept {len(report.kept)} build(s), {verb} {len(report.removed)}"
          + (f", {len(report.in_use)} in use left alone" if report.in_use else "")
          + f"; {verb} {report.blobs_removed} blob(s), {report.blob_bytes_freed / (1 << 20):.1f} MiB")
    for build_id in report.removed:
        print(f"  {verb} {build_id}")
    for build_id in report.in_use:
        print(f"  in use  {build_id}")
    return 0

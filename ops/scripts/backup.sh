#!/usr/bin/env bash
# Back up llmq: PostgreSQL (pg_dump, custom format) and Redis (an RDB snapshot taken with redis-cli --rdb,
# which holds every stream, consumer group and pending entry). Deployment manual §5.1.
#
# Usage: backup.sh [BACKUP_DIR]
# Environment:
#   LLMQ_DATABASE_URL  postgresql://user@host:5432/llm_queue   (password: PGPASSWORD or ~/.pgpass)
#   LLMQ_REDIS_URL     redis://:password@host:6379/0 or rediss://…   (the password is passed to
#                      redis-cli through REDISCLI_AUTH, never on its command line)
#   BACKUP_DIR         where backups go (default /data/llm-queue/backups)
#   KEEP_DAYS          delete backups older than this (default 7)
#   PG_BINDIR          folder of pg_dump, when the one on PATH is older than the server
#   REDIS_CLI          redis-cli to use (default: redis-cli on PATH)
# Cron (daily at 02:00):  0 2 * * * /opt/llmq/ops/scripts/backup.sh >> /data/llm-queue/logs/backup.log 2>&1
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
  exit 0
fi
dir="${1:-${BACKUP_DIR:-/data/llm-queue/backups}}"
: "${LLMQ_DATABASE_URL:?set LLMQ_DATABASE_URL (see backup.sh --help)}"
: "${LLMQ_REDIS_URL:?set LLMQ_REDIS_URL (see backup.sh --help)}"
keep_days="${KEEP_DAYS:-7}"
pg_dump="${PG_BINDIR:+$PG_BINDIR/}pg_dump"
redis_cli="${REDIS_CLI:-redis-cli}"
stamp="$(date -u +%Y%m%d_%H%M%S)"
umask 077  # the backups hold every prompt and answer: their owner's alone
mkdir -p "$dir"

# shellcheck source=ops/scripts/_redis_auth.sh
source "$(dirname "$0")/_redis_auth.sh"
# shellcheck source=ops/scripts/_pg_auth.sh
source "$(dirname "$0")/_pg_auth.sh"

# Redis first, then PostgreSQL: a message is in Redis until its outcome is archived, so each one accepted
# before the snapshot is either in it or was archived before it, and so before the dump began. The other
# order loses the messages archived while the dump runs: too late for the dump, gone from Redis by the
# snapshot. Each file is written under a .partial name and renamed when complete: a backup that is there
# is whole.
echo "$(date -u +%FT%TZ) redis backup -> $dir/redis_$stamp.rdb"
"$redis_cli" -u "$redis_url" "${redis_user[@]}" --no-auth-warning --rdb "$dir/redis_$stamp.rdb.partial" >/dev/null
mv "$dir/redis_$stamp.rdb.partial" "$dir/redis_$stamp.rdb"

echo "$(date -u +%FT%TZ) postgres backup -> $dir/postgres_$stamp.dump"
"$pg_dump" --format=custom --no-owner --file "$dir/postgres_$stamp.dump.partial" "$pg_url"
mv "$dir/postgres_$stamp.dump.partial" "$dir/postgres_$stamp.dump"

find "$dir" -maxdepth 1 \( -name 'postgres_*.dump' -o -name 'redis_*.rdb' -o -name '*.partial' \) \
  -mtime +"$keep_days" -delete
echo "$(date -u +%FT%TZ) backup complete: $stamp"

#!/usr/bin/env bash
# The maintenance checklist of the deployment manual (§9.2), as checks that print what they find and fail
# loudly: disk space, log size, the archive's row count, stream lengths and consumer-group backlog,
# dead letters, the newest backup. Exit 0 when every check passed, 1 when one failed (each failure is
# printed as "FAIL: …").
#
# Usage: maintenance.sh
# Environment: LLMQ_DATABASE_URL, LLMQ_REDIS_URL (as for backup.sh), LLMQ_KEY_PREFIX (default {llmq}),
#   DATA_DIR (default /data/llm-queue), LOG_DIR (default $DATA_DIR/logs), BACKUP_DIR (default
#   $DATA_DIR/backups), LOG_KEEP_DAYS (rotated logs older than this are deleted, default 30),
#   DISK_MAX_PCT (default 85), PG_BINDIR (folder of psql), REDIS_CLI.
set -uo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
data_dir="${DATA_DIR:-/data/llm-queue}"
log_dir="${LOG_DIR:-$data_dir/logs}"
backup_dir="${BACKUP_DIR:-$data_dir/backups}"
prefix="${LLMQ_KEY_PREFIX:-{llmq\}}"
psql="${PG_BINDIR:+$PG_BINDIR/}psql"
failed=0
fail() { echo "FAIL: $*"; failed=1; }

# shellcheck source=ops/scripts/_redis_auth.sh
source "$(dirname "$0")/_redis_auth.sh"
rcli() { "${REDIS_CLI:-redis-cli}" -u "$redis_url" --no-auth-warning "$@"; }

echo "== disk ($data_dir)"
if [[ -d "$data_dir" ]]; then
  df -h "$data_dir"
  used="$(df --output=pcent "$data_dir" | tail -1 | tr -dc '0-9')"
  (( used <= ${DISK_MAX_PCT:-85} )) || fail "disk $used% used (limit ${DISK_MAX_PCT:-85}%)"
else
  fail "no data folder $data_dir"
fi

echo "== logs ($log_dir)"
if [[ -d "$log_dir" ]]; then
  du -sh "$log_dir"
  find "$log_dir" -name '*.log.*' -mtime +"${LOG_KEEP_DAYS:-30}" -print -delete
else
  echo "no log folder (stages log to stdout)"
fi

echo "== postgres: archived messages"
if [[ -z "${LLMQ_DATABASE_URL:-}" ]]; then
  fail "LLMQ_DATABASE_URL is not set"
elif ! count="$("$psql" "$LLMQ_DATABASE_URL" -XAtq -v ON_ERROR_STOP=1 -c 'SELECT COUNT(*) FROM messages' 2>&1)"; then
  fail "postgres: $count"
else
  echo "messages: $count"
fi

echo "== redis: streams (length, and per group: lag + pending)"
if [[ -z "$redis_url" ]]; then
  fail "LLMQ_REDIS_URL is not set"
elif ! pong="$(rcli ping 2>&1)" || [[ "$pong" != "PONG" ]]; then
  fail "redis: $pong"
else
  streams="$(rcli --scan --pattern "$prefix:q:*" | sort)"
  for stream in $streams "$prefix:dispatch" "$prefix:retry" "$prefix:done" "$prefix:dlq"; do
    printf '%-28s length %s\n' "$stream" "$(rcli xlen "$stream")"
    # XINFO GROUPS answers name/consumers/pending/last-delivered-id/entries-read/lag pairs per group.
    rcli xinfo groups "$stream" 2>/dev/null | paste - - | awk -v s="$stream" '
      $1 == "name" { g = $2 } $1 == "pending" { p = $2 }
      $1 == "lag" { printf "%-28s   group %-9s pending %s lag %s\n", s, g, p, ($2 == "" ? "?" : $2) }'
  done
  echo "dead letters: $(rcli xlen "$prefix:dlq") (llmq-stage dlq list)"
fi

echo "== backups ($backup_dir)"
newest="$(find "$backup_dir" -maxdepth 1 -name 'postgres_*.dump' -printf '%T@ %p\n' 2>/dev/null \
  | sort -n | tail -1 | cut -d' ' -f2-)"
if [[ -z "$newest" ]]; then
  fail "no backup in $backup_dir (ops/scripts/backup.sh)"
elif [[ -n "$(find "$newest" -mtime +1)" ]]; then
  fail "newest backup $newest is older than a day"
elif ! "${PG_BINDIR:+$PG_BINDIR/}pg_restore" --list "$newest" >/dev/null; then
  fail "backup $newest is unreadable"
else
  echo "newest: $newest (readable)"
fi

(( failed == 0 )) && echo "maintenance: all checks passed"
exit "$failed"

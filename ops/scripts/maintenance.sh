#!/usr/bin/env bash
# The maintenance checklist of the deployment manual (§9.2), as checks that print what they find and fail
# loudly: disk space, log size, the archive's row count, Redis memory (under REDIS_MAX_PCT of maxmemory,
# policy noeviction) and persistence (append-only file on, last writes ok), stream lengths and each
# consumer group's backlog (entries not yet delivered, counted, and pending), dead letters, the newest
# backup. Exit 0 when every check passed, 1 when one failed (each failure is printed as "FAIL: …", each
# advice as "WARN: …").
#
# Usage: maintenance.sh
# Cron (daily at 02:30, after backup.sh):
#   30 2 * * * set -a; . /etc/llmq/backup.env; /opt/llmq/ops/scripts/maintenance.sh >> /data/llm-queue/logs/maintenance.log 2>&1
# Environment: LLMQ_DATABASE_URL, LLMQ_REDIS_URL (as for backup.sh), LLMQ_KEY_PREFIX (default {llmq}),
#   DATA_DIR (default /data/llm-queue), LOG_DIR (default $DATA_DIR/logs), BACKUP_DIR (default
#   $DATA_DIR/backups), LOG_KEEP_DAYS (rotated logs older than this are deleted, default 30),
#   DISK_MAX_PCT (default 85), REDIS_MAX_PCT (default 80), PG_BINDIR (folder of psql), REDIS_CLI.
set -uo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"
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
# shellcheck source=ops/scripts/_pg_auth.sh
source "$(dirname "$0")/_pg_auth.sh"
rcli() { "${REDIS_CLI:-redis-cli}" -u "$redis_url" "${redis_user[@]}" --no-auth-warning "$@"; }

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
elif ! count="$("$psql" "$pg_url" -XAtq -v ON_ERROR_STOP=1 -c 'SELECT COUNT(*) FROM messages' 2>&1)"; then
  fail "postgres: $count"
else
  echo "messages: $count"
fi

echo "== redis: memory and persistence"
info() { rcli info "$1" | tr -d '\r' | awk -F: -v k="$2" '$1 == k { print $2 }'; }
if [[ -z "$redis_url" ]]; then
  fail "LLMQ_REDIS_URL is not set"
elif ! pong="$(rcli ping 2>&1)" || [[ "$pong" != "PONG" ]]; then
  fail "redis: $pong"
else
  used="$(info memory used_memory)" max="$(info memory maxmemory)" policy="$(info memory maxmemory_policy)"
  echo "used_memory $used bytes, maxmemory ${max:-0}, policy $policy"
  if [[ "${max:-0}" == 0 ]]; then
    echo "WARN: no maxmemory: Redis can grow until the host runs out (ops/README.md, Redis sizing)"
  elif (( used * 100 / max > ${REDIS_MAX_PCT:-80} )); then
    fail "redis memory at $(( used * 100 / max ))% of maxmemory (limit ${REDIS_MAX_PCT:-80}%)"
  fi
  [[ "$policy" == "noeviction" ]] || fail "maxmemory-policy is $policy: a queue must never evict (noeviction)"
  aof="$(info persistence aof_enabled)"
  echo "appendonly $([[ "$aof" == 1 ]] && echo yes || echo no), last AOF write $(info persistence aof_last_write_status)," \
    "last rewrite $(info persistence aof_last_bgrewrite_status), last RDB save $(info persistence rdb_last_bgsave_status)"
  [[ "$aof" == 1 ]] || fail "appendonly is off: what Redis acknowledged since its last snapshot is lost in a crash"
  for status in aof_last_write_status aof_last_bgrewrite_status rdb_last_bgsave_status; do
    value="$(info persistence "$status")"
    [[ -z "$value" || "$value" == "ok" ]] || fail "redis $status is $value (its log says why)"
  done
fi

echo "== redis: streams (length; per group: waiting = entries not yet delivered, pending = delivered, not acked)"
if [[ -n "$redis_url" && "${pong:-}" == "PONG" ]]; then
  # How many entries of a stream come after an id (at most 10001): what a group has not been given yet.
  after='return #redis.call("XRANGE", KEYS[1], "(" .. ARGV[1], "+", "COUNT", 10001)'
  streams="$(rcli --scan --pattern "$prefix:q:*" | sort)"
  for stream in $streams "$prefix:dispatch" "$prefix:retry" "$prefix:done" "$prefix:dlq"; do
    printf '%-28s length %s\n' "$stream" "$(rcli xlen "$stream")"
    # XINFO GROUPS answers name/consumers/pending/last-delivered-id/entries-read/lag pairs per group. Its
    # lag is an estimate Redis cannot always make (empty) or keep right (entries deleted): the entries
    # after the group's last delivered one are counted instead.
    while read -r group pending delivered; do
      waiting="$(rcli eval "$after" 1 "$stream" "$delivered")"
      [[ "$waiting" == 10001 ]] && waiting="10000+"
      printf '%-28s   group %-9s waiting %s pending %s\n' "$stream" "$group" "$waiting" "$pending"
    done < <(rcli xinfo groups "$stream" 2>/dev/null | paste - - | awk '
      $1 == "name" { g = $2 } $1 == "pending" { p = $2 } $1 == "last-delivered-id" { print g, p, $2 }')
  done
  echo "dead letters: $(rcli xlen "$prefix:dlq") (llmq-stage dlq list)"
fi

echo "== backups ($backup_dir)"
newest="$(find "$backup_dir" -maxdepth 1 -name 'postgres_*.dump' -printf '%T@ %p\n' 2>/dev/null \
  | sort -n | tail -1 | cut -d' ' -f2-)"
if [[ -z "$newest" ]]; then
  fail "no backup in $backup_dir (ops/scripts/backup.sh)"
elif [[ -n "$(find "$newest" -mmin +1500)" ]]; then  # 25 hours: a daily backup missed once
  fail "newest backup $newest is older than a day"
elif ! "${PG_BINDIR:+$PG_BINDIR/}pg_restore" --list "$newest" >/dev/null; then
  fail "backup $newest is unreadable"
else
  echo "newest: $newest (readable)"
fi

(( failed == 0 )) && echo "maintenance: all checks passed"
exit "$failed"

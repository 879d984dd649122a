#!/usr/bin/env bash
# Restore an llmq backup made by backup.sh. Deployment manual §5.2.
#
# Usage:
#   restore.sh postgres FILE.dump
#       Replaces the llmq tables of LLMQ_DATABASE_URL with the backup, in one transaction.
#       Stop the archive stage first; start it again afterwards.
#   restore.sh redis FILE.rdb DATA_DIR
#       Installs the snapshot in the data folder of a STOPPED Redis (the folder its `dir` names). The
#       current files are moved to DATA_DIR/pre-restore-<time>/, never deleted. The snapshot becomes both
#       dump.rdb and the base of a fresh append-only file, so Redis loads it with appendonly on or off.
#       Then start Redis, then the stages.
# Environment: LLMQ_DATABASE_URL, PG_BINDIR (folder of pg_restore), LLMQ_REDIS_URL (used only to refuse
#   when Redis still answers), REDIS_CLI, APPENDDIRNAME (default appendonlydir), APPENDFILENAME
#   (default appendonly.aof).
set -euo pipefail

usage() { sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ $# -ge 2 ]] || usage
what="$1" file="$2"
[[ -f "$file" ]] || { echo "restore.sh: no such backup file: $file" >&2; exit 2; }

case "$what" in
  postgres)
    : "${LLMQ_DATABASE_URL:?set LLMQ_DATABASE_URL}"
    "${PG_BINDIR:+$PG_BINDIR/}pg_restore" --clean --if-exists --no-owner --single-transaction \
      --exit-on-error --dbname "$LLMQ_DATABASE_URL" "$file"
    echo "postgres restored from $file"
    ;;
  redis)
    [[ $# -eq 3 ]] || usage
    data_dir="$3"
    [[ -d "$data_dir" ]] || { echo "restore.sh: no such Redis data folder: $data_dir" >&2; exit 2; }
    if [[ -n "${LLMQ_REDIS_URL:-}" ]] && "${REDIS_CLI:-redis-cli}" -u "$LLMQ_REDIS_URL" --no-auth-warning ping \
        >/dev/null 2>&1; then
      echo "restore.sh: Redis at LLMQ_REDIS_URL still answers; stop it first" >&2
      exit 3
    fi
    aof_dir="${APPENDDIRNAME:-appendonlydir}" aof="${APPENDFILENAME:-appendonly.aof}"
    aside="$data_dir/pre-restore-$(date -u +%Y%m%d_%H%M%S)"
    mkdir -p "$aside"
    for old in "$data_dir/dump.rdb" "$data_dir/$aof_dir"; do
      [[ -e "$old" ]] && mv "$old" "$aside/"
    done
    cp "$file" "$data_dir/dump.rdb"
    mkdir "$data_dir/$aof_dir"
    cp "$file" "$data_dir/$aof_dir/$aof.1.base.rdb"
    : > "$data_dir/$aof_dir/$aof.1.incr.aof"
    printf 'file %s seq 1 type b\nfile %s seq 1 type i\n' "$aof.1.base.rdb" "$aof.1.incr.aof" \
      > "$data_dir/$aof_dir/$aof.manifest"
    echo "redis snapshot installed in $data_dir (previous files in $aside); start Redis now"
    ;;
  *) usage ;;
esac

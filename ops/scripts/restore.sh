#!/usr/bin/env bash
# Restore an llmq backup made by backup.sh. Deployment manual §5.2.
#
# Usage:
#   restore.sh postgres FILE.dump
#       Replaces the llmq tables of LLMQ_DATABASE_URL with the backup, in one transaction.
#       Stop the archive stage first; start it again afterwards. A database that is gone is created
#       first when LLMQ_ADMIN_DATABASE_URL names another database of the same server (postgres) as a
#       user allowed to CREATE DATABASE.
#   restore.sh redis FILE.rdb DATA_DIR
#       Installs the snapshot in the data folder of a STOPPED Redis (the folder its `dir` names). The
#       current files are moved to DATA_DIR/pre-restore-<time>/, never deleted. The snapshot becomes both
#       dump.rdb and the base of a fresh append-only file, so Redis loads it with appendonly on or off.
#       LLMQ_REDIS_URL names that Redis: the restore refuses while it answers (or give --stopped
#       after DATA_DIR, when its address is unknown here). Then start Redis, then the stages.
# Environment: LLMQ_DATABASE_URL, LLMQ_ADMIN_DATABASE_URL, PG_BINDIR (folder of pg_restore and psql),
#   LLMQ_REDIS_URL, REDIS_CLI, APPENDDIRNAME (default appendonlydir), APPENDFILENAME (default
#   appendonly.aof).
set -euo pipefail

usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit "${1:-2}"; }
[[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && usage 0
[[ $# -ge 2 ]] || usage
what="$1" file="$2"
[[ -f "$file" ]] || { echo "restore.sh: no such backup file: $file" >&2; exit 2; }

case "$what" in
  postgres)
    : "${LLMQ_DATABASE_URL:?set LLMQ_DATABASE_URL}"
    # shellcheck source=ops/scripts/_pg_auth.sh
    source "$(dirname "$0")/_pg_auth.sh"
    psql="${PG_BINDIR:+$PG_BINDIR/}psql"
    if ! answer="$("$psql" "$pg_url" -tAc 'SELECT 1' 2>&1)"; then
      if [[ ! "$answer" =~ database\ \"[^\"]*\"\ does\ not\ exist ]]; then
        echo "restore.sh: cannot reach the database of LLMQ_DATABASE_URL: $answer" >&2
        exit 4
      fi
      # The database is gone: its name and owner, from a URL (user@…/name?…) or a conninfo (dbname=, user=)
      owner=""
      if [[ "$pg_url" =~ ^postgres(ql)?://(([^@/]*)@)?[^/]*/([^?]+) ]]; then
        name="${BASH_REMATCH[4]}" owner="${BASH_REMATCH[3]}"
      elif [[ "$pg_url" =~ (^|[[:space:]])dbname=([^[:space:]]+) ]]; then
        name="${BASH_REMATCH[2]}"
        [[ "$pg_url" =~ (^|[[:space:]])user=([^[:space:]]+) ]] && owner="${BASH_REMATCH[2]}"
      else
        echo "restore.sh: the database of LLMQ_DATABASE_URL does not exist, and its name cannot be read" >&2
        exit 2
      fi
      if [[ -z "${LLMQ_ADMIN_DATABASE_URL:-}" ]]; then
        echo "restore.sh: database \"$name\" does not exist; create it (createdb $name), or set" \
          "LLMQ_ADMIN_DATABASE_URL to the same server's postgres database and run this again" >&2
        exit 2
      fi
      # Owned by llmq's user, who restores into it (PostgreSQL 15 lets only the owner create in public).
      # The admin's password, like llmq's, reaches psql through PGPASSWORD.
      sql="CREATE DATABASE \"${name//\"/\"\"}\"${owner:+ OWNER \"${owner//\"/\"\"}\"}"
      pg_split "$LLMQ_ADMIN_DATABASE_URL"
      PGPASSWORD="${pg_split_password:-${PGPASSWORD:-}}" "$psql" "$pg_split_url" -v ON_ERROR_STOP=1 -qc "$sql"
      echo "database $name created"
    fi
    "${PG_BINDIR:+$PG_BINDIR/}pg_restore" --clean --if-exists --no-owner --single-transaction \
      --exit-on-error --dbname "$pg_url" "$file"
    echo "postgres restored from $file"
    ;;
  redis)
    [[ $# -eq 3 || ( $# -eq 4 && "$4" == "--stopped" ) ]] || usage
    data_dir="$3"
    [[ -d "$data_dir" ]] || { echo "restore.sh: no such Redis data folder: $data_dir" >&2; exit 2; }
    if [[ -z "${LLMQ_REDIS_URL:-}" && "${4:-}" != "--stopped" ]]; then
      echo "restore.sh: set LLMQ_REDIS_URL to the Redis whose data folder this is, so the restore can" \
        "check it is stopped (or pass --stopped after DATA_DIR once you have stopped it)" >&2
      exit 2
    fi
    if [[ "${4:-}" != "--stopped" ]]; then
      # Stopped means nothing accepts a connection at its address. Any other outcome (a reply, a TLS or
      # password error, no answer in time) may be a live server: refused.
      if [[ "$LLMQ_REDIS_URL" =~ ^unix://([^?]*) ]]; then
        [[ -S "${BASH_REMATCH[1]}" ]] && listening=0 || listening=1
      elif [[ "$LLMQ_REDIS_URL" =~ ^rediss?://([^@/]*@)?(\[[^]/]*\]|[^:/?]*)(:([0-9]+))? ]]; then
        host="${BASH_REMATCH[2]#[}" port="${BASH_REMATCH[4]:-6379}"
        host="${host%]}"
        listening=0
        # shellcheck disable=SC2016  # $1 and $2 are the inner shell's arguments
        timeout 5 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "${host:-localhost}" "$port" 2>/dev/null || listening=$?
      else
        echo "restore.sh: cannot read an address in LLMQ_REDIS_URL; stop Redis and pass --stopped" >&2
        exit 2
      fi
      if (( listening == 0 || listening == 124 )); then
        echo "restore.sh: something still answers (or does not refuse) at the address of LLMQ_REDIS_URL;" \
          "stop it first" >&2
        exit 3
      fi
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

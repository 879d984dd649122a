# Sourced by backup.sh, restore.sh and maintenance.sh: split the password out of a PostgreSQL URL so the
# tools get it through PGPASSWORD, never on their command line (where `ps` shows it).
# postgresql://user:password@host/db → password and postgresql://user@host/db. The password is
# percent-decoded, as libpq reads the URL ("%2F" is "/"). A conninfo ("host=… dbname=…") is left as it is.
# shellcheck shell=bash disable=SC2034  # pg_url is read by the scripts that source this file

# pg_split URL: sets pg_split_url (the URL without its password) and pg_split_password ('' for none).
pg_split() {
  pg_split_url="$1" pg_split_password=""
  if [[ "$1" =~ ^(postgres(ql)?://)([^:@/]*):([^@/]*)@(.*)$ ]]; then
    local password="${BASH_REMATCH[4]//\\/\\\\}"
    pg_split_password="$(printf '%b' "${password//%/\\x}")"
    pg_split_url="${BASH_REMATCH[1]}${BASH_REMATCH[3]}@${BASH_REMATCH[5]}"
  fi
}

# LLMQ_DATABASE_URL → pg_url, its password in PGPASSWORD.
pg_split "${LLMQ_DATABASE_URL:-}"
pg_url="$pg_split_url"
if [[ -n "$pg_split_password" ]]; then
  PGPASSWORD="$pg_split_password"
  export PGPASSWORD
fi

# Sourced by backup.sh, restore.sh and maintenance.sh: split the password out of LLMQ_DATABASE_URL so the
# PostgreSQL tools get it through PGPASSWORD, never on their command line (where `ps` shows it).
# postgresql://user:password@host/db → PGPASSWORD=password and pg_url=postgresql://user@host/db.
# shellcheck shell=bash
# The password is percent-decoded, as libpq reads the URL ("%2F" is "/"). A conninfo ("host=… dbname=…")
# is left as it is.
pg_url="${LLMQ_DATABASE_URL:-}"
if [[ "$pg_url" =~ ^(postgres(ql)?://)([^:@/]*):([^@/]*)@(.*)$ ]]; then
  _password="${BASH_REMATCH[4]//\\/\\\\}"
  PGPASSWORD="$(printf '%b' "${_password//%/\\x}")"
  export PGPASSWORD
  unset _password
  pg_url="${BASH_REMATCH[1]}${BASH_REMATCH[3]}@${BASH_REMATCH[5]}"
fi

# Sourced by backup.sh, restore.sh and maintenance.sh: split the user and password out of LLMQ_REDIS_URL so
# redis-cli gets the password through REDISCLI_AUTH, never on its command line (where `ps` shows it), and
# the user (an ACL user) as --user: redis-cli would take a user left alone in the URL for a password.
# redis://user:password@host → REDISCLI_AUTH=password, redis_user=(--user user), redis_url=redis://host.
# shellcheck shell=bash disable=SC2034  # redis_user is read by the scripts that source this file
# The password is percent-decoded, as llmq reads the URL ("%2F" is "/"); a backslash stays a backslash.
redis_url="${LLMQ_REDIS_URL:-}"
redis_user=()
if [[ "$redis_url" =~ ^(rediss?://)([^:@/]*):([^@/]*)@(.*)$ ]]; then
  _password="${BASH_REMATCH[3]//\\/\\\\}"
  REDISCLI_AUTH="$(printf '%b' "${_password//%/\\x}")"
  export REDISCLI_AUTH
  unset _password
  [[ -n "${BASH_REMATCH[2]}" ]] && redis_user=(--user "${BASH_REMATCH[2]}")
  redis_url="${BASH_REMATCH[1]}${BASH_REMATCH[4]}"
fi

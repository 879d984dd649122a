# Sourced by backup.sh and maintenance.sh: split the password out of LLMQ_REDIS_URL so redis-cli gets it
# through REDISCLI_AUTH, never on its command line (where `ps` shows it).
# redis://user:password@host → REDISCLI_AUTH=password and redis_url=redis://user@host.
# shellcheck shell=bash
# The password is percent-decoded, as llmq reads the URL ("%2F" is "/"); a backslash stays a backslash.
redis_url="${LLMQ_REDIS_URL:-}"
if [[ "$redis_url" =~ ^(rediss?://)([^:@/]*):([^@/]*)@(.*)$ ]]; then
  _password="${BASH_REMATCH[3]//\\/\\\\}"
  REDISCLI_AUTH="$(printf '%b' "${_password//%/\\x}")"
  export REDISCLI_AUTH
  unset _password
  redis_url="${BASH_REMATCH[1]}${BASH_REMATCH[2]:+${BASH_REMATCH[2]}@}${BASH_REMATCH[4]}"
fi

# Sourced by backup.sh and maintenance.sh: split the password out of LLMQ_REDIS_URL so redis-cli gets it
# through REDISCLI_AUTH, never on its command line (where `ps` shows it).
# redis://user:password@host → REDISCLI_AUTH=password and redis_url=redis://user@host.
# shellcheck shell=bash
redis_url="${LLMQ_REDIS_URL:-}"
if [[ "$redis_url" =~ ^(rediss?://)([^:@/]*):([^@/]*)@(.*)$ ]]; then
  export REDISCLI_AUTH="${BASH_REMATCH[3]}"
  redis_url="${BASH_REMATCH[1]}${BASH_REMATCH[2]:+${BASH_REMATCH[2]}@}${BASH_REMATCH[4]}"
fi

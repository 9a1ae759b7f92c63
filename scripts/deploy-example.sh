#!/bin/sh
# An example deployment script: exchange the CI job's OIDC token for short-lived credentials,
# run the deploy with them, and revoke the lease when the script ends, however it ends (success,
# failure, Ctrl-C, SIGTERM from a cancelled job).
#
#   EPHEMERA_BROKER_URL=https://ephemera.example.com EPHEMERA_POLICY=deploy-web \
#       scripts/deploy-example.sh ./deploy.sh --env prod
#
# with the job's ID token in EPHEMERA_ID_TOKEN: in GitLab CI, declare it with
# `id_tokens: {EPHEMERA_ID_TOKEN: {aud: https://ephemera.example.com}}`; elsewhere, put it in a
# file and set EPHEMERA_ID_TOKEN_FILE.
#
# Environment:
#   EPHEMERA_BROKER_URL      the broker's URL (https; plain http only to 127.0.0.1/localhost).
#   EPHEMERA_POLICY          the policy to exchange against.
#   EPHEMERA_TTL             optional lease lifetime, e.g. 10m.
#   EPHEMERA_ID_TOKEN        the job's OIDC ID token, or
#   EPHEMERA_ID_TOKEN_FILE   a file holding it.
#
# The deploy command (the arguments) runs with the credentials in its environment, as the
# broker's `env` format names them (EPHEMERA_<CRED>_<FIELD>, and AWS_* for a single aws
# credential); it does not get the ID token. The script exits with the deploy command's status.
# It prints the lease id, never a secret. Needs only POSIX sh and curl (7.76 or newer).
set -eu

fail() {
    echo "ephemera: $*" >&2
    exit 1
}

[ "$#" -gt 0 ] || fail "usage: $0 DEPLOY-COMMAND [ARGS...]"
[ -n "${EPHEMERA_BROKER_URL:-}" ] || fail "set EPHEMERA_BROKER_URL"
[ -n "${EPHEMERA_POLICY:-}" ] || fail "set EPHEMERA_POLICY"
if [ -n "${EPHEMERA_ID_TOKEN_FILE:-}" ]; then
    EPHEMERA_ID_TOKEN=$(cat "$EPHEMERA_ID_TOKEN_FILE") || fail "cannot read EPHEMERA_ID_TOKEN_FILE"
fi
: "${EPHEMERA_ID_TOKEN:?set EPHEMERA_ID_TOKEN or EPHEMERA_ID_TOKEN_FILE}"
case "$EPHEMERA_BROKER_URL" in
    https://* | http://127.0.0.1:* | http://127.0.0.1/* | http://localhost:* | http://localhost/*) ;;
    *) fail "EPHEMERA_BROKER_URL must be an https:// URL" ;;
esac
# The JSON body is built by hand (no jq): only characters that need no escaping.
case "$EPHEMERA_POLICY" in
    *[!A-Za-z0-9._-]*) fail "EPHEMERA_POLICY may hold only letters, digits, '.', '_' and '-'" ;;
esac
case "${EPHEMERA_TTL:-}" in
    *[!A-Za-z0-9]*) fail "EPHEMERA_TTL must be a duration like 10m or 1h" ;;
esac
broker=${EPHEMERA_BROKER_URL%/}
# Kept in a plain shell variable for the revoke; the deploy command does not inherit it.
id_token=$EPHEMERA_ID_TOKEN
unset EPHEMERA_ID_TOKEN EPHEMERA_ID_TOKEN_FILE

# The token reaches curl on stdin as a config line, never on a command line (visible to other
# processes).
broker_post() { # PATH BODY [CURL-ARGS...]
    path=$1
    body=$2
    shift 2
    printf 'header = "Authorization: Bearer %s"\n' "$id_token" |
        curl -sS --fail-with-body --retry 3 --retry-connrefused --connect-timeout 10 --max-time 30 \
            -K - -X POST -H 'Content-Type: application/json' --data "$body" "$@" "$broker$path"
}

lease=
# Revokes the lease (if there is one) and removes the private directory; keeps the exit status.
# A failed revoke is a warning: the broker's job webhook and the lease's TTL are the backstop.
cleanup() {
    status=$?
    trap - EXIT HUP INT TERM
    if [ -n "$lease" ]; then
        if reply=$(broker_post /v1/revoke "{\"lease_id\":\"$lease\"}" 2>&1); then
            case "$reply" in
                *"\"revoked\":[\"$lease\"]"*) echo "ephemera: lease $lease revoked" >&2 ;;
                *"\"pending\":[\"$lease\"]"*) echo "ephemera: lease $lease ended; some revocations pending" >&2 ;;
                *) echo "ephemera: lease $lease was not live (already ended or expired)" >&2 ;;
            esac
        else
            echo "WARNING: ephemera: could not revoke lease $lease ($reply); its TTL ends it" >&2
        fi
    fi
    rm -rf "${workdir:-}"
    exit "$status"
}
trap cleanup EXIT
# A signal exits with 128+N, which runs the EXIT trap.
trap 'exit 129' HUP
trap 'exit 130' INT
trap 'exit 143' TERM

# A private directory (0700) for the reply; it lives only until the reply is sourced.
workdir=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/ephemera.XXXXXX")
envfile=$workdir/credentials.env
if [ -n "${EPHEMERA_TTL:-}" ]; then
    body="{\"policy\":\"$EPHEMERA_POLICY\",\"ttl\":\"$EPHEMERA_TTL\"}"
else
    body="{\"policy\":\"$EPHEMERA_POLICY\"}"
fi
# Retries cover connection failures, timeouts, 408, 429 and 5xx: a failed exchange issued
# nothing. (A reply lost after the broker issued makes the retry a replay, refused with a 403;
# that lease ends with its TTL.)
status=$(broker_post /v1/exchange "$body" -H 'Accept: text/plain' -o "$envfile" -w '%{http_code}') || true
if [ "$status" != 201 ] || ! head -n 1 "$envfile" 2>/dev/null | grep -q "^export EPHEMERA_LEASE_ID='lse_[0-9A-Za-z]*'\$"; then
    # An error reply is JSON without secrets; its message names the claim that decided a denial.
    reply=$(head -c 2000 "$envfile" 2>/dev/null || true)
    code=$(printf '%s' "$reply" | sed -n 's/.*"code":"\([^"]*\)".*/\1/p')
    message=$(printf '%s' "$reply" | sed -n 's/.*"message":"\([^"]*\)".*/\1/p')
    [ -n "$code" ] && fail "exchange failed: HTTP $status $code: $message"
    [ "${status:-000}" = 000 ] && fail "exchange failed: the broker at $broker could not be reached"
    fail "exchange failed: HTTP $status, not a broker reply"
fi
lease=$(sed -n "1s/^export EPHEMERA_LEASE_ID='\(lse_[0-9A-Za-z]*\)'\$/\1/p" "$envfile")
# shellcheck disable=SC1090 # the broker's reply: single-quoted `export` lines only
. "$envfile"
rm -f "$envfile"
echo "ephemera: lease $lease (policy $EPHEMERA_POLICY, expires $EPHEMERA_EXPIRES_AT)" >&2

# The deploy. Not `exec`: the EXIT trap must run after it.
set +e
"$@"
status=$?
set -e
exit "$status"

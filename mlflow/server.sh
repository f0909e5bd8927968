#!/usr/bin/env bash
# The MLflow tracking server of a production Tuneline: runs and the model registry in
# PostgreSQL, artifacts in S3, proxied by the server (clients need no S3 credentials).
# Every setting comes from the environment; none is written here. See mlflow/README.md.
#
#   backend store   MLFLOW_BACKEND_STORE_URI, or built from libpq's PGHOST (required), PGPORT (5432),
#                   PGUSER (mlflow), PGDATABASE (mlflow). The password stays out of the URI and the
#                   process list: libpq reads PGPASSWORD (or PGPASSFILE) itself, and PGSSLMODE too.
#   artifacts       MLFLOW_ARTIFACTS_DESTINATION (required), e.g. s3://tuneline-artifacts/mlflow;
#                   S3 endpoint/region/credentials: AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL or
#                   MLFLOW_S3_ENDPOINT_URL (MinIO, moto; unset for AWS), AWS_DEFAULT_REGION,
#                   AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a role (IRSA on EKS).
#   listening       MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000), MLFLOW_WORKERS (2),
#                   MLFLOW_ALLOWED_HOSTS (host names clients use, when not localhost).
#   auth            MLFLOW_AUTH=basic-auth turns on MLflow's basic auth (--app-name basic-auth), with
#                   MLFLOW_AUTH_CONFIG_PATH (default: basic_auth.ini beside this script),
#                   MLFLOW_AUTH_ADMIN_PASSWORD (required on the first start) and
#                   MLFLOW_FLASK_SERVER_SECRET_KEY (CSRF key, the same on every replica);
#                   needs `pip install 'mlflow[auth]'`.
#   MLFLOW_BIN      the mlflow executable (default: mlflow on PATH).
#   MLFLOW_SERVER_DRY_RUN=1 prints the command instead of running it.
# Any arguments are passed on to `mlflow server`.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

if [[ -z "${MLFLOW_BACKEND_STORE_URI:-}" ]]; then
  : "${PGHOST:?set PGHOST (and PGPASSWORD, PGUSER, PGDATABASE) or MLFLOW_BACKEND_STORE_URI}"
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg://${PGUSER:-mlflow}@${PGHOST}:${PGPORT:-5432}/${PGDATABASE:-mlflow}"
fi
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql*) ;;
  *) echo "server.sh: MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI (got a different scheme)" >&2; exit 2 ;;
esac
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION, e.g. s3://bucket/mlflow}"

args=(server
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI"
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION"
  --serve-artifacts
  --host "${MLFLOW_HOST:-127.0.0.1}"
  --port "${MLFLOW_PORT:-5000}"
  --workers "${MLFLOW_WORKERS:-2}")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
case "${MLFLOW_AUTH:-none}" in
  basic-auth)
    export MLFLOW_AUTH_CONFIG_PATH="${MLFLOW_AUTH_CONFIG_PATH:-$here/basic_auth.ini}"
    : "${MLFLOW_FLASK_SERVER_SECRET_KEY:?basic-auth needs MLFLOW_FLASK_SERVER_SECRET_KEY (the CSRF key)}"
    args+=(--app-name basic-auth) ;;
  none|"") ;;
  *) echo "server.sh: MLFLOW_AUTH must be basic-auth or none, got '${MLFLOW_AUTH}'" >&2; exit 2 ;;
esac

if [[ "${MLFLOW_SERVER_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${MLFLOW_BIN:-mlflow}" "${args[@]}" "$@"; echo
  exit 0
fi
exec "${MLFLOW_BIN:-mlflow}" "${args[@]}" "$@"

#!/usr/bin/env bash
# Prepare the end-to-end tests (tests/e2e): Label Studio 1.23.2 in its own virtualenv (it pins its own
# Django, numpy and pandas, so it never shares ours), a migrated empty database to copy per test session
# (migrating takes 1-2 minutes of CPU; copying takes nothing), and Debian's chromium for the browser check.
# Idempotent: everything present is reused, so CI can cache LS_E2E_VENV between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

LS_VERSION="${LS_VERSION:-1.23.2}"
LS_E2E_VENV="${LS_E2E_VENV:-.cache/ls-venv}"
PYTHON="${PYTHON:-python3}"
# pip mirrors configured on some machines print one warning per package: keep the log readable.
quiet() { "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }

# chromium installs in the background while pip works: the two downloads overlap.
chromium_pid=""
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
	echo "chromium: present"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
	echo "chromium: installing with apt-get (in the background)"
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) &
	chromium_pid=$!
else
	echo "chromium: missing; install Debian's chromium package (sudo apt-get install chromium)" >&2
	exit 1
fi

if [ -x "$LS_E2E_VENV/bin/label-studio" ] && [ -f "$LS_E2E_VENV/.ls-$LS_VERSION" ]; then
	echo "label-studio $LS_VERSION: reusing $LS_E2E_VENV"
else
	echo "label-studio $LS_VERSION: installing into $LS_E2E_VENV (1-3 minutes)"
	rm -rf "$LS_E2E_VENV"
	"$PYTHON" -m venv "$LS_E2E_VENV"
	quiet "$LS_E2E_VENV/bin/pip" install -q --upgrade pip
	quiet "$LS_E2E_VENV/bin/pip" install -q "label-studio==$LS_VERSION"
	test -x "$LS_E2E_VENV/bin/label-studio"
	# Written last, so an interrupted install is redone rather than reused.
	touch "$LS_E2E_VENV/.ls-$LS_VERSION"
fi

TEMPLATE="$LS_E2E_VENV/db-template"
if [ -f "$TEMPLATE/label_studio.sqlite3" ]; then
	echo "label-studio database template: reusing $TEMPLATE"
else
	echo "label-studio database template: migrating an empty database (1-2 minutes)"
	building="$(mktemp -d "${TMPDIR:-/tmp}/ls-template.XXXXXX")"
	trap 'rm -rf "$building"' EXIT
	mkdir -p "$building/home" "$building/data"
	manage="$("$LS_E2E_VENV/bin/python" -c 'import label_studio, os; print(os.path.join(os.path.dirname(label_studio.__file__), "manage.py"))')"
	HOME="$building/home" LABEL_STUDIO_BASE_DATA_DIR="$building/data" SENTRY_DSN= FRONTEND_SENTRY_DSN= \
		COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false \
		"$LS_E2E_VENV/bin/python" "$manage" migrate --no-color -v 0 >"$building/migrate.log" 2>&1 \
		|| { cat "$building/migrate.log" >&2; exit 1; }
	mkdir -p "$TEMPLATE"
	# Only the database: the data dir's .env holds a per-instance SECRET_KEY.
	cp "$building/data/label_studio.sqlite3" "$TEMPLATE/label_studio.sqlite3.part"
	mv "$TEMPLATE/label_studio.sqlite3.part" "$TEMPLATE/label_studio.sqlite3"
fi

if [ -n "$chromium_pid" ]; then
	wait "$chromium_pid" || { echo "chromium: apt-get install failed" >&2; exit 1; }
	echo "chromium: installed"
fi
echo "e2e set-up ready"

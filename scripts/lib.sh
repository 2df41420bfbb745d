# Shared helpers for the image build scripts. Sourced, not run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${VMRUN_CACHE:-$HOME/.cache/vmrun}"
mkdir -p "$CACHE"

log() { printf '[%s] %s\n' "${STEP:-vmrun}" "$*" >&2; }
die() { printf '[%s] error: %s\n' "${STEP:-vmrun}" "$*" >&2; exit 1; }

# hash_inputs FILE... : a short hash of the named files' contents and names.
hash_inputs() {
    local f
    for f in "$@"; do
        printf '%s\n' "${f#"$REPO"/}"
        cat "$f"
    done | sha256sum | cut -c1-16
}

# need CMD PACKAGE : fail clearly when a tool is missing.
need() {
    command -v "$1" >/dev/null 2>&1 || die "'$1' is missing: install the Debian package '$2' (or run scripts/install-deps.sh)"
}

# publish NAME TARGET : point the stable name in the cache at a keyed build output.
publish() {
    ln -sfn "$2" "$CACHE/$1.tmp" && mv -T "$CACHE/$1.tmp" "$CACHE/$1"
}

# prune PREFIX KEEP : remove older keyed outputs "$CACHE/PREFIX-*" other than KEEP.
prune() {
    local d
    for d in "$CACHE/$1"-*; do
        [ -d "$d" ] && [ "$d" != "$2" ] && rm -rf "$d"
    done
    return 0
}

# with_progress LOG CMD... : run CMD with its output in LOG, showing progress (lines of output
# and elapsed time) in place on a terminal, or a line every 30 s otherwise. On failure, the end
# of the log is shown.
with_progress() {
    local logf="$1"; shift
    local start=$SECONDS pid rc=0 every=30 next=30
    "$@" >"$logf" 2>&1 &
    pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        sleep 1
        local el=$((SECONDS - start)) lines
        lines=$(wc -l <"$logf" 2>/dev/null || echo 0)
        if [ -t 2 ]; then
            printf '\r[%s] %dm%02ds, %s lines of output ' "${STEP:-vmrun}" $((el / 60)) $((el % 60)) "$lines" >&2
        elif [ "$el" -ge "$next" ]; then
            log "$(printf '%dm%02ds, %s lines of output' $((el / 60)) $((el % 60)) "$lines")"
            next=$((next + every))
        fi
    done
    wait "$pid" || rc=$?
    [ -t 2 ] && printf '\n' >&2
    if [ "$rc" -ne 0 ]; then
        tail -n 40 "$logf" >&2
        die "failed (exit $rc) after $((SECONDS - start))s; full log: $logf"
    fi
    log "done in $((SECONDS - start))s"
}

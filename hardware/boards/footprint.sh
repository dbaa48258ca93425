#!/usr/bin/env bash
# Footprint report of the firmware agent image (issue 4, part 6):
#   - flash (vector table + text + rodata + data's load image) and RAM
#     (data + bss) of the lm3s6965evb agent image, and what eats the flash,
#     grouped by crate;
#   - the instructions of one P-256 key generation, signature and
#     verification, counted exactly in QEMU (one instruction per translation
#     block and an execution trace; see common/src/bench.rs);
#   - the peak stack of a real enrollment, measured by the image itself
#     (stack painting) during the QEMU end-to-end test. Skip it with
#     --no-enroll (it starts a gateway and takes about a minute).
#
# Needs: the thumbv7m-none-eabi target, qemu-system-arm, GNU binutils (nm,
# readelf). Usage: hardware/boards/footprint.sh [--no-enroll]
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)

enroll=1
[[ "${1:-}" == "--no-enroll" ]] && enroll=0

command -v qemu-system-arm >/dev/null || { echo "qemu-system-arm is not installed (Debian: qemu-system-arm)" >&2; exit 1; }
command -v nm >/dev/null && command -v readelf >/dev/null || { echo "GNU binutils (nm, readelf) needed" >&2; exit 1; }

target_dir="${CARGO_TARGET_DIR:-$root/target}/boards"
board=lm3s6965evb
triple=thumbv7m-none-eabi
(cd "hardware/boards/$board" && CARGO_TARGET_DIR="$target_dir" cargo build --release --locked --quiet)
# The image a device ships: no semihosting (its own target directory, so
# switching features does not rebuild the other).
(cd "hardware/boards/$board" && CARGO_TARGET_DIR="$target_dir/product" \
    cargo build --release --locked --quiet --no-default-features --bin agent)
product="$target_dir/product/$triple/release/agent"
image="$target_dir/$triple/release/agent"
bench="$target_dir/$triple/release/sign-bench"

section() { # size of an ELF section in bytes, empty if absent
    readelf -S --wide "$1" | awk -v name="$2" '{ for (i = 1; i < NF; i++) if ($i == name) { print strtonum("0x" $(i + 4)); exit } }'
}
size_of() { local s; s=$(section "$1" "$2"); echo "${s:-0}"; }
kib() { awk -v b="$1" 'BEGIN { printf "%.1f KiB", b / 1024 }'; }

report_image() { # title, ELF
    local vectors text rodata data bss uninit flashsim flash ram
    vectors=$(size_of "$2" .vector_table)
    text=$(size_of "$2" .text)
    rodata=$(size_of "$2" .rodata)
    data=$(size_of "$2" .data)
    bss=$(size_of "$2" .bss)
    uninit=$(size_of "$2" .uninit)
    flashsim=$(size_of "$2" .flashsim)
    flash=$((vectors + text + rodata + data))
    ram=$((data + bss + uninit))
    echo "== $1"
    printf '  flash: %6d bytes (%s)  = vectors %d + text %d + rodata %d + data %d\n' \
        "$flash" "$(kib "$flash")" "$vectors" "$text" "$rodata" "$data"
    printf '  RAM:   %6d bytes static = data %d + bss %d (the stack comes on top)\n' \
        "$ram" "$data" "$((bss + uninit))"
    printf '  credential-store flash stand-in in RAM (QEMU only, not counted): %d bytes\n' "$flashsim"
    static_ram=$ram
}

report_image "$board agent image as shipped ($triple, opt-level s, fat LTO, 1 codegen unit, panic abort, no semihosting)" "$product"
echo
report_image "$board agent image for QEMU tests (with semihosting reports)" "$image"

echo
echo "== flash of the shipped image by crate (text + rodata symbols; a generic is"
echo "   counted under the first crate its symbol names)"
nm -C --size-sort -S "$product" | awk '
    $3 ~ /^[tTrR]$/ {
        name = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name)
        crate = "(unnamed: tables, constants)"
        if (match(name, /[A-Za-z_][A-Za-z0-9_]*::/)) crate = substr(name, RSTART, RLENGTH - 2)
        size[crate] += strtonum("0x" $2)
    }
    END { for (c in size) printf "  %7d  %s\n", size[c], c }' | sort -rn | head -n 15

echo
echo "== P-256 in instructions (Cortex-M3, p256 0.13 without assembly, QEMU exact count)"
mark=$(nm "$bench" | awk '$3 == "idgate_bench_mark" { print $1; exit }')
mark=$((16#$mark & ~1))
fifo=$(mktemp -u)
mkfifo "$fifo"
trap 'rm -f "$fifo"' EXIT
counts=$(awk -v mark="$(printf '%08x' "$mark")" '
    /^Trace/ {
        split($4, f, "/")
        if (f[2] == mark) { if (n > 0) printf "%d ", count; n++; count = 0 }
        else count++
    }' "$fifo" &
    timeout 300 qemu-system-arm -M "$board" -nographic -monitor none -serial null \
        -semihosting-config enable=on,target=native -singlestep \
        -d exec,nochain -D "$fifo" -kernel "$bench" >"$fifo.out" 2>&1 || true
    wait)
read -r keygen sign verify <<<"$counts"
echo "  key generation: ${keygen:-?} instructions"
echo "  signature:      ${sign:-?} instructions"
echo "  verification:   ${verify:-?} instructions"
grep -E "stack peak|verified" "$fifo.out" | sed 's/^/  sign-bench /' || true
rm -f "$fifo.out"

if ((enroll)); then
    echo
    echo "== peak stack of a real enrollment (QEMU, real gateway; tests/tests/e2e/qemu.rs)"
    report=$(cargo test --locked -q -p idgate-tests --test e2e qemu::lm3s6965 -- --nocapture 2>&1) \
        || { echo "$report" >&2; exit 1; }
    grep -E "footprint: stack peak" <<<"$report" | sed 's/^/  /'
    peak=$(grep -oE "stack peak [0-9]+" <<<"$report" | grep -oE "[0-9]+" | head -n 1)
    if [[ -n "$peak" ]]; then
        total=$((static_ram + peak))
        printf '  RAM including stack: %d bytes (%s)\n' "$total" "$(kib "$total")"
    fi
fi

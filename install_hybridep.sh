#!/usr/bin/env bash
# install_hybridep.sh: build DeepEP (the `deep_ep` package) for this machine's GPUs and install it,
# for moe_dispatch's FusedTokenRouter (moe_dispatch/dispatchers/deepep.py).
#
# It clones DeepEP from its upstream repository (or copies a local checkout given with --src),
# builds a wheel against the installed torch, installs it and checks that `import deep_ep` works.
# Nothing of DeepEP lives in this repository; the optional patches below edit only the scratch
# copy that is built.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: bash install_hybridep.sh [options]

Build and install DeepEP (deep_ep) for the GPUs of this machine.

Options:
  --ref REF              DeepEP tag, branch or commit to build (default: v1.2.1, DeepEP's last V1
                         release). With --src, checks REF out in the scratch copy.
  --repo URL             DeepEP git repository (default: https://github.com/deepseek-ai/DeepEP.git).
  --src DIR              Build from this local DeepEP checkout instead of cloning (no network
                         needed). DIR itself is never modified: it is copied to the work dir.
  --intranode-only       Build without NVSHMEM (NVLink within one node only; no internode or
                         low-latency kernels). Taken automatically when NVSHMEM is not found.
                         DeepEP V1's setup.py has no switch for this (it enables NVSHMEM whenever
                         the nvidia-nvshmem pip wheel is importable) and adds -rdc=true, whose
                         device-link step it only sets up for NVSHMEM builds; so this mode edits
                         the scratch copy's setup.py: NVSHMEM forced off, -rdc=true dropped (the
                         intranode sources have no cross-file device code).
  --patch-nvshmem-guards Opt-in fix for DeepEP revisions after v1.2.1 (the elastic "mask buffer"
                         additions) whose csrc/deep_ep.cpp calls internode_ll:: functions outside
                         `#ifndef DISABLE_NVSHMEM`, which breaks intranode-only builds: wraps each
                         such call in the guard, in the scratch copy. v1.2.1 needs no patch.
                         Without this flag an intranode-only build of such a revision stops early
                         and names the calls.
  --work-dir DIR         Scratch directory for the source copy and the build (default: a new
                         temporary directory, removed after a successful install).
  --wheel-dir DIR        Where to write the wheel (default: WORK_DIR/wheelhouse).
  --no-install           Build the wheel only.
  --keep-work-dir        Keep the scratch directory.
  --dry-run              Print what would be done; change nothing.
  -h, --help             This help.

Environment:
  FORCE_ARCH             Compute capability to build for (e.g. 9.0, 10.0), skipping detection.
  PYTHON                 Python interpreter with torch installed (default: python3, else python).
  NVSHMEM_DIR            NVSHMEM installation to build against (default: the nvidia-nvshmem-cu*
                         pip wheel, when installed).
  MAX_JOBS               Parallel compile jobs (default: number of CPUs).

Examples:
  bash install_hybridep.sh                                  # clone v1.2.1, detect GPU and NVSHMEM
  bash install_hybridep.sh --src ~/DeepEP --intranode-only  # offline build from a checkout
EOF
}

REPO_URL="https://github.com/deepseek-ai/DeepEP.git"
REF="v1.2.1"
REF_GIVEN=0
SRC=""
INTRANODE_ONLY=0
PATCH_GUARDS=0
WORK_DIR=""
WHEEL_DIR=""
NO_INSTALL=0
KEEP_WORK_DIR=0
DRY_RUN=0

log() { printf '[install_hybridep] %s\n' "$*"; }
warn() { printf '[install_hybridep] warning: %s\n' "$*" >&2; }
die() { printf '[install_hybridep] error: %s\n' "$*" >&2; exit 1; }

# Print a command (shell-quoted where needed), then run it unless this is a dry run.
run() {
    local words=() arg
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./=:,+@%-]+$ ]]; then words+=("$arg"); else words+=("${arg@Q}"); fi
    done
    printf '+ %s\n' "${words[*]}"
    if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value (see --help)"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --ref) need_value "$@"; REF="$2"; REF_GIVEN=1; shift 2 ;;
        --repo) need_value "$@"; REPO_URL="$2"; shift 2 ;;
        --src) need_value "$@"; SRC="$2"; shift 2 ;;
        --intranode-only) INTRANODE_ONLY=1; shift ;;
        --patch-nvshmem-guards) PATCH_GUARDS=1; shift ;;
        --work-dir) need_value "$@"; WORK_DIR="$2"; shift 2 ;;
        --wheel-dir) need_value "$@"; WHEEL_DIR="$2"; shift 2 ;;
        --no-install) NO_INSTALL=1; shift ;;
        --keep-work-dir) KEEP_WORK_DIR=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

[[ $DRY_RUN -eq 1 ]] && log "dry run: printing the steps, changing nothing"

# --- Python with torch ------------------------------------------------------------------------------
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3 >/dev/null 2>&1; then PYTHON=python3
    elif command -v python >/dev/null 2>&1; then PYTHON=python
    else die "no python3 or python on PATH; set PYTHON to the interpreter that has torch"; fi
fi
if ! TORCH_INFO=$("$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>/dev/null); then
    die "$PYTHON cannot import torch; DeepEP builds against the installed torch (set PYTHON to the right interpreter)"
fi
log "python: $(command -v "$PYTHON"), torch/CUDA: $TORCH_INFO"
CUDA_HOME_FOUND=$("$PYTHON" -c 'from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or "")' 2>/dev/null || true)
if [[ -z "$CUDA_HOME_FOUND" ]]; then
    msg="no CUDA toolkit found (torch looks at CUDA_HOME and nvcc on PATH); set CUDA_HOME"
    if [[ $DRY_RUN -eq 1 ]]; then warn "$msg"; else die "$msg"; fi
else
    log "CUDA toolkit: $CUDA_HOME_FOUND"
fi
if ! SETUPTOOLS_PROBLEM=$("$PYTHON" - <<'PY' 2>&1
import importlib.util
import sys
try:
    import setuptools
except ImportError:
    sys.exit("setuptools is not installed (pip install setuptools)")
version = tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit())
if version < (70, 1) and importlib.util.find_spec("wheel") is None:
    sys.exit(f"setuptools {setuptools.__version__} builds wheels only with the `wheel` package (pip install wheel)")
PY
); then
    if [[ $DRY_RUN -eq 1 ]]; then warn "$SETUPTOOLS_PROBLEM"; else die "$SETUPTOOLS_PROBLEM"; fi
fi
if [[ "$("$PYTHON" -c 'import torch.utils.cpp_extension as c; print(int(c.is_ninja_available()))' 2>/dev/null || echo 0)" != 1 ]]; then
    warn "ninja not found: the build falls back to serial compilation (pip install ninja to speed it up)"
fi

# --- GPU architecture -------------------------------------------------------------------------------
detect_caps() {
    local caps=""
    if command -v nvidia-smi >/dev/null 2>&1; then
        caps=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | tr -d ' ' | sort -u || true)
    fi
    if [[ -z "$caps" ]]; then
        caps=$("$PYTHON" -c 'import torch
print("\n".join(sorted({"%d.%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})))' \
            2>/dev/null || true)
    fi
    printf '%s' "$caps"
}

DISABLE_SM90=0
if [[ -n "${FORCE_ARCH:-}" ]]; then
    CAPS="$FORCE_ARCH"
    log "GPU architecture: $CAPS (FORCE_ARCH)"
else
    CAPS=$(detect_caps)
    [[ -n "$CAPS" ]] || die "found no GPU (neither nvidia-smi nor torch.cuda report one); set FORCE_ARCH=9.0 (Hopper) or 10.0 (Blackwell) to build anyway"
    log "GPU architecture(s): $(echo $CAPS)"
fi
ARCH_LIST=""
for cap in $CAPS; do
    case "$cap" in
        9.0|10.*) ;;
        8.*)
            [[ -n "${FORCE_ARCH:-}" ]] || die "compute capability $cap (Ampere): DeepEP builds it only without SM90 features and NVSHMEM; set FORCE_ARCH=$cap to do so"
            DISABLE_SM90=1; INTRANODE_ONLY=1 ;;
        *)
            [[ -n "${FORCE_ARCH:-}" ]] || die "compute capability $cap is not a target of DeepEP's normal kernels (Hopper 9.0, Blackwell 10.x); set FORCE_ARCH to try anyway"
            warn "building for compute capability $cap, which DeepEP does not target" ;;
    esac
    ARCH_LIST="${ARCH_LIST:+$ARCH_LIST;}$cap"
done

# --- NVSHMEM ------------------------------------------------------------------------------------------
NVSHMEM_FOUND=""
if [[ $INTRANODE_ONLY -eq 0 ]]; then
    if [[ -n "${NVSHMEM_DIR:-}" ]]; then
        NVSHMEM_FOUND="$NVSHMEM_DIR"
    else
        NVSHMEM_FOUND=$("$PYTHON" - <<'PY' 2>/dev/null || true
import importlib.util
try:
    spec = importlib.util.find_spec("nvidia.nvshmem")
except ModuleNotFoundError:
    spec = None
print(spec.submodule_search_locations[0] if spec and spec.submodule_search_locations else "")
PY
)
    fi
    if [[ -n "$NVSHMEM_FOUND" ]]; then
        log "NVSHMEM: $NVSHMEM_FOUND (internode and low-latency kernels included)"
    else
        log "NVSHMEM not found (no NVSHMEM_DIR, no nvidia-nvshmem-cu* wheel): building intranode-only"
        INTRANODE_ONLY=1
    fi
fi
[[ $INTRANODE_ONLY -eq 1 ]] && log "mode: intranode-only (NVSHMEM off)"

# --- scratch copy of the source ----------------------------------------------------------------------
AUTO_WORK_DIR=0
if [[ -z "$WORK_DIR" ]]; then
    AUTO_WORK_DIR=1
    if [[ $DRY_RUN -eq 1 ]]; then WORK_DIR="${TMPDIR:-/tmp}/hybridep-build.XXXXXX"
    else WORK_DIR=$(mktemp -d "${TMPDIR:-/tmp}/hybridep-build.XXXXXX"); fi
elif [[ -e "$WORK_DIR/DeepEP" ]]; then
    die "$WORK_DIR/DeepEP already exists; remove it or pick another --work-dir"
fi
BUILD_SRC="$WORK_DIR/DeepEP"
WHEEL_DIR="${WHEEL_DIR:-$WORK_DIR/wheelhouse}"
log "work dir: $WORK_DIR"

if [[ -n "$SRC" ]]; then
    [[ -f "$SRC/setup.py" ]] || die "--src $SRC: no setup.py there; point it at the top of a DeepEP checkout"
    log "source: $SRC (copied; the copy is what gets patched and built)"
    run mkdir -p "$WORK_DIR"
    run cp -a "$SRC" "$BUILD_SRC"
    run rm -rf "$BUILD_SRC/build" "$BUILD_SRC/dist" "$BUILD_SRC/deep_ep.egg-info"
    if [[ $REF_GIVEN -eq 1 ]]; then
        [[ -d "$SRC/.git" ]] || die "--ref $REF with --src needs a git checkout ($SRC has no .git)"
        run git -C "$BUILD_SRC" checkout --detach "$REF"
    fi
else
    command -v git >/dev/null 2>&1 || die "git is needed to clone $REPO_URL (or pass --src DIR)"
    log "source: $REPO_URL at $REF"
    run mkdir -p "$WORK_DIR"
    if ! run git clone --depth 1 --branch "$REF" "$REPO_URL" "$BUILD_SRC"; then
        log "$REF is not a branch or tag; cloning the full history to check out a commit"
        run rm -rf "$BUILD_SRC"
        run git clone "$REPO_URL" "$BUILD_SRC"
        run git -C "$BUILD_SRC" checkout --detach "$REF"
    fi
fi

# --- patches of the scratch copy (intranode-only builds) -------------------------------------------
# setup.py: NVSHMEM off, and no -rdc=true (its device-link step exists only for NVSHMEM builds).
patch_setup_py() {
    "$PYTHON" - "$1" <<'PY'
import pathlib
import re
import sys

path = pathlib.Path(sys.argv[1])
text = path.read_text()
tag = "# [install_hybridep.sh --intranode-only]"
if tag in text:
    print(f"  {path}: already patched")
    sys.exit(0)
lines = text.splitlines(keepends=True)
for i, line in enumerate(lines):
    m = re.match(r"(\s*)if not disable_nvshmem\s*:", line)
    if m:
        lines.insert(i, f"{m.group(1)}disable_nvshmem = True  {tag} NVSHMEM off\n")
        break
else:
    sys.exit(f"  {path}: found no `if not disable_nvshmem:` to force NVSHMEM off; this setup.py is not "
             "DeepEP V1's. Build with NVSHMEM, or edit it by hand.")
text = "".join(lines)
text, n_first = re.subn(r"""['"]-rdc=true['"]\s*,\s*""", "", text)
text, n_last = re.subn(r""",\s*['"]-rdc=true['"]""", "", text)
n_rdc = n_first + n_last
path.write_text(text)
print(f"  {path}: NVSHMEM forced off; -rdc=true dropped from {n_rdc} flag list(s)")
PY
}

# csrc/deep_ep.cpp: calls into internode:: / internode_ll:: (compiled only with NVSHMEM) outside
# an `#ifndef DISABLE_NVSHMEM` block. With --patch-nvshmem-guards, wrap each in that guard.
check_guards() {  # $1: file, $2: 1 to patch
    "$PYTHON" - "$1" "$2" <<'PY'
import collections
import pathlib
import re
import sys

path, patch = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
lines = path.read_text().splitlines(keepends=True)
names = collections.Counter(re.findall(r"#\s*if(?:n?def)?\b[^\n]*?\b(DISABLE_NVSHMEM\w*)", "".join(lines)))
macro = names.most_common(1)[0][0] if names else "DISABLE_NVSHMEM"
call = re.compile(r"\binternode(?:_ll)?::\w+\s*\(")
stack = []  # per open conditional: [code here is NVSHMEM-only, flips at #else]
out, found = [], []
i = 0
while i < len(lines):
    line, code = lines[i], lines[i].strip()
    if code.startswith("#"):
        d = code[1:].strip()
        if re.match(r"if(n?def)?\b", d):
            about = bool(re.search(rf"\b{macro}\b", d))
            negated = d.startswith("ifndef") or bool(re.match(rf"if\s*!\s*defined\s*\(?\s*{macro}\b", d))
            stack.append([about and negated, about])
        elif re.match(r"(else|elif)\b", d) and stack:
            if stack[-1][1]:
                stack[-1][0] = not stack[-1][0]
        elif d.startswith("endif") and stack:
            stack.pop()
        out.append(line)
        i += 1
        continue
    if not any(s[0] for s in stack) and call.search(line.split("//")[0]):
        j = i
        while j + 1 < len(lines) and not lines[j].split("//")[0].rstrip().endswith(";"):
            j += 1
        found.append(f"{path.name}:{i + 1}: {code}")
        out.append(f"#ifndef {macro}  // added by install_hybridep.sh --patch-nvshmem-guards\n")
        out.extend(lines[i:j + 1])
        out.append("#endif\n")
        i = j + 1
        continue
    out.append(line)
    i += 1
if not found:
    print(f"  {path}: every internode call is inside #ifndef {macro}")
    sys.exit(0)
print(f"  {path}: {len(found)} internode call(s) outside #ifndef {macro}:")
for f in found:
    print(f"    {f}")
if not patch:
    sys.exit(3)
path.write_text("".join(out))
print(f"  wrapped them in #ifndef {macro}")
PY
}

if [[ $INTRANODE_ONLY -eq 1 ]]; then
    log "patching the scratch copy for an intranode-only build:"
    if [[ $DRY_RUN -eq 1 ]]; then
        log "  would force NVSHMEM off and drop -rdc=true in $BUILD_SRC/setup.py"
        log "  would check $BUILD_SRC/csrc/deep_ep.cpp for internode calls outside the NVSHMEM guard$([[ $PATCH_GUARDS -eq 1 ]] && echo ' and wrap them')"
    else
        patch_setup_py "$BUILD_SRC/setup.py" || die "could not patch setup.py for an intranode-only build"
        if [[ -f "$BUILD_SRC/csrc/deep_ep.cpp" ]]; then
            rc=0
            check_guards "$BUILD_SRC/csrc/deep_ep.cpp" "$PATCH_GUARDS" || rc=$?
            if [[ $rc -eq 3 ]]; then
                die "this DeepEP revision calls NVSHMEM-only code outside its guard, so it cannot build intranode-only as is; rerun with --patch-nvshmem-guards (edits only the scratch copy), or build with NVSHMEM"
            elif [[ $rc -ne 0 ]]; then
                die "checking csrc/deep_ep.cpp failed"
            fi
        fi
    fi
elif [[ $PATCH_GUARDS -eq 1 ]]; then
    log "--patch-nvshmem-guards ignored: building with NVSHMEM, where the guards do not matter"
fi

# --- build, install, verify ----------------------------------------------------------------------------
BUILD_ENV=(TORCH_CUDA_ARCH_LIST="$ARCH_LIST" MAX_JOBS="${MAX_JOBS:-$(nproc 2>/dev/null || echo 8)}")
UNSET_ENV=()
if [[ $INTRANODE_ONLY -eq 1 ]]; then
    UNSET_ENV=(-u NVSHMEM_DIR)
else
    BUILD_ENV+=(NVSHMEM_DIR="$NVSHMEM_FOUND")
fi
[[ $DISABLE_SM90 -eq 1 ]] && BUILD_ENV+=(DISABLE_SM90_FEATURES=1)

log "building the wheel (TORCH_CUDA_ARCH_LIST=$ARCH_LIST)"
run mkdir -p "$WHEEL_DIR"
run env "${UNSET_ENV[@]}" "${BUILD_ENV[@]}" "$PYTHON" -m pip wheel --no-build-isolation --no-deps --no-index \
    --wheel-dir "$WHEEL_DIR" "$BUILD_SRC"

if [[ $DRY_RUN -eq 1 ]]; then
    WHEEL="$WHEEL_DIR/deep_ep-*.whl"
else
    WHEEL=$(ls -t "$WHEEL_DIR"/deep_ep-*.whl 2>/dev/null | head -n 1 || true)
    [[ -n "$WHEEL" ]] || die "the build produced no deep_ep wheel in $WHEEL_DIR"
fi
log "wheel: $WHEEL"

if [[ $NO_INSTALL -eq 1 ]]; then
    log "--no-install: not installing; install later with: $PYTHON -m pip install --no-deps $WHEEL"
    exit 0
fi
run "$PYTHON" -m pip install --no-deps --no-index --force-reinstall "$WHEEL"

log "verifying (from / so the source tree cannot shadow the installed package)"
(
    run cd /
    run "$PYTHON" -c 'import deep_ep, deep_ep_cpp; print("import deep_ep: OK", deep_ep.__file__, "| SM90 features:", getattr(deep_ep.Buffer, "is_sm90_compiled", lambda: "?")())'
) || die "the wheel installed but \`import deep_ep\` fails (see above)"

if [[ $AUTO_WORK_DIR -eq 1 && $KEEP_WORK_DIR -eq 0 && $DRY_RUN -eq 0 ]]; then
    rm -rf "$WORK_DIR"
    log "removed the scratch directory $WORK_DIR"
fi
log "done: DeepEP $( [[ $INTRANODE_ONLY -eq 1 ]] && echo intranode-only || echo with NVSHMEM ) for compute capability $ARCH_LIST"

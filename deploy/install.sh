#!/usr/bin/env bash
# Install (or remove) tdad-inspector on an edge box: system user, directories, venv, systemd unit,
# starter config. Idempotent: a second run with the same arguments changes nothing.
#
#   sudo deploy/install.sh --station station1 [--source DIR_OR_WHEEL] [--web-port 8080]
#        [--plant-broker HOST[:PORT] --plant-ca CA.crt --plant-cert STATION.crt --plant-key STATION.key [--plant-cmd]]
#   sudo deploy/install.sh --uninstall [--purge]
#   DESTDIR=/tmp/root deploy/install.sh --station station1 --no-venv     # staging / tests
#
# DESTDIR (default empty = the real root) prefixes every path. Under DESTDIR the real user database
# and systemd are left alone: the `inspector` user is not created and nothing is chowned (the intended
# owners are printed instead), so a staged tree can be built without root.
# --web-port sets the station page's port in a new starter config (one port per station on a box); the
# page's control token is made once in /etc/inspector/secrets/<station>.web-token.
# --plant-broker bridges the station's topics from this box's mosquitto to the plant broker over TLS (port 8883 by
# default): /etc/mosquitto/conf.d/inspector-bridge-<station>.conf from deploy/mosquitto/bridge.conf.in, the plant
# CA and the station's client certificate and key copied to /etc/mosquitto/inspector/plant/; a new starter
# config publishes at QoS 2. --plant-cmd also bridges the plant's commands in (docs/plant.md).
# TORCH_INDEX_URL (optional) is the pip index for torch. Default: when nvidia-smi works, the CUDA wheels that fit
# its driver (https://download.pytorch.org/whl/cu130 for a CUDA 13 driver, .../cu128 for CUDA 12) plus the [gpu]
# extra (TensorRT + cuda-python; [gpu-cu13] on a CUDA 13 driver); else the CPU-only wheels (.../whl/cpu).
set -euo pipefail
umask 022

readonly TORCH_PIN="torch==2.13.0"
readonly SVC_USER="inspector"
script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

usage() {
    sed -n '2,21s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
    exit "${1:-0}"
}

die() { echo "install.sh: error: $*" >&2; exit 2; }
note() { echo "install.sh: $*"; }

station=""
web_port=8080
source_dir="$(dirname "$script_dir")"
with_venv=1
mode="install"
purge=0
plant_broker=""
plant_ca=""
plant_cert=""
plant_key=""
plant_cmd=0
while (($#)); do
    case "$1" in
        --station) station="${2:?--station needs a name}"; shift 2 ;;
        --source) source_dir="${2:?--source needs a directory or wheel}"; shift 2 ;;
        --web-port) web_port="${2:?--web-port needs a port number}"; shift 2 ;;
        --no-venv) with_venv=0; shift ;;
        --plant-broker) plant_broker="${2:?--plant-broker needs HOST[:PORT]}"; shift 2 ;;
        --plant-ca) plant_ca="${2:?--plant-ca needs the plant CA certificate}"; shift 2 ;;
        --plant-cert) plant_cert="${2:?--plant-cert needs the station certificate file}"; shift 2 ;;
        --plant-key) plant_key="${2:?--plant-key needs the station key file}"; shift 2 ;;
        --plant-cmd) plant_cmd=1; shift ;;
        --uninstall) mode="uninstall"; shift ;;
        --purge) purge=1; shift ;;
        -h | --help) usage 0 ;;
        *) echo "install.sh: unknown argument '$1'" >&2; usage 2 ;;
    esac
done

((purge == 0)) || [[ "$mode" == "uninstall" ]] || die "--purge only goes with --uninstall"
root="${DESTDIR:-}"
root="${root%/}"
etc_dir="$root/etc/inspector"
secrets_dir="$etc_dir/secrets"
lib_dir="$root/var/lib/inspector"
cache_dir="$root/var/cache/inspector"
opt_dir="$root/opt/tdad-inspector"
venv_dir="$opt_dir/venv"
unit_path="$root/etc/systemd/system/inspector@.service"
mosquitto_dir="$root/etc/mosquitto"
plant_tls_dir="$mosquitto_dir/inspector/plant"

# True when changes to the real system (users, chown, systemctl) are allowed.
real_root() { [[ -z "$root" ]]; }
systemd_running() { real_root && [[ -d /run/systemd/system ]]; }

# Set owner:group where allowed; under DESTDIR only report the intent.
own() {
    local owner="$1"
    shift
    if real_root; then
        chown "$owner" "$@"
    elif [[ -z "${own_notice_shown:-}" ]]; then
        note "DESTDIR set: not creating user '$SVC_USER' or changing owners; chown at deployment:"
        note "  root:$SVC_USER /etc/inspector (0750) and its *.toml/*.env (0640);"
        note "  $SVC_USER:$SVC_USER /etc/inspector/secrets (0700) and its files (0600), /var/lib/inspector/<station> (0750)"
        own_notice_shown=1
    fi
}

# Copy a file only when its content or mode differs, so reruns keep the tree (and mtimes) unchanged.
install_file() {
    local mode_bits="$1" src="$2" dst="$3"
    if ! cmp -s "$src" "$dst" 2>/dev/null; then
        install -D -m "$mode_bits" "$src" "$dst"
    fi
    chmod "$mode_bits" "$dst"
}

ensure_user() {
    real_root || return 0
    if ! getent passwd "$SVC_USER" >/dev/null; then
        useradd --system --user-group --home-dir /var/lib/inspector --no-create-home \
            --shell /usr/sbin/nologin --comment "tdad-inspector daemon" "$SVC_USER"
        note "created system user '$SVC_USER'"
    fi
    # USB3 Vision cameras are usually reachable through the plugdev/video groups (vendor udev rules).
    local group
    for group in plugdev video; do
        if getent group "$group" >/dev/null && ! id -nG "$SVC_USER" | tr ' ' '\n' | grep -qx "$group"; then
            usermod -a -G "$group" "$SVC_USER"
        fi
    done
}

make_dirs() {
    install -d -m 0755 "$opt_dir" "$root/etc/systemd/system"
    install -d -m 0750 "$etc_dir" "$etc_dir/tls" "$lib_dir" "$lib_dir/skus" "$cache_dir"
    install -d -m 0700 "$secrets_dir"
    install -d -m 0750 "$lib_dir/$station" "$lib_dir/$station/spool" "$lib_dir/$station/archive" \
        "$lib_dir/$station/skus"
    own "root:$SVC_USER" "$etc_dir" "$etc_dir/tls" "$lib_dir" "$lib_dir/skus" "$cache_dir"
    own "$SVC_USER:$SVC_USER" "$secrets_dir" "$lib_dir/$station" "$lib_dir/$station/spool" \
        "$lib_dir/$station/archive" "$lib_dir/$station/skus"
}

make_venv() {
    if ((!with_venv)); then
        note "--no-venv: skipping the virtual environment in $venv_dir"
        return 0
    fi
    [[ -n "$root" ]] && note "warning: a venv built under DESTDIR has DESTDIR in its script paths"
    [[ -x "$venv_dir/bin/python" ]] || python3 -m venv "$venv_dir"
    local pip=("$venv_dir/bin/python" -m pip install --disable-pip-version-check --quiet)
    local constraints="$opt_dir/constraints.txt"
    # The constraint keeps pip from ever resolving a second torch (e.g. a multi-GB CUDA build).
    echo "$TORCH_PIN" >"$constraints.new"
    install_file 0644 "$constraints.new" "$constraints"
    rm -f "$constraints.new"
    local extra="" torch_index="${TORCH_INDEX_URL:-}" driver_cuda
    if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
        driver_cuda="$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)"
        if ((${driver_cuda:-12} >= 13)); then
            extra="[gpu-cu13]"
            torch_index="${torch_index:-https://download.pytorch.org/whl/cu130}"
        else
            extra="[gpu]"
            torch_index="${torch_index:-https://download.pytorch.org/whl/cu128}"
        fi
        note "nvidia-smi works (driver for CUDA ${driver_cuda:-?}): CUDA torch and the $extra extra (TensorRT, cuda-python)"
    elif [[ -z "$torch_index" ]]; then
        torch_index="https://download.pytorch.org/whl/cpu"
    fi
    if [[ -n "$torch_index" ]]; then
        "${pip[@]}" --index-url "$torch_index" "$TORCH_PIN"
    else
        "${pip[@]}" "$TORCH_PIN"
    fi
    # torch 2.13.0+cpu satisfies the constraint (local version labels are ignored by ==2.13.0).
    "${pip[@]}" --constraint "$constraints" "$source_dir$extra"
}

# The config template: the source tree's inspector.toml, else the one next to this script's repo.
config_template() {
    local candidate
    for candidate in "$source_dir/inspector.toml" "$(dirname "$script_dir")/inspector.toml"; do
        if [[ -f "$candidate" ]]; then
            echo "$candidate"
            return 0
        fi
    done
    die "no inspector.toml in '$source_dir' or '$(dirname "$script_dir")'; pass --source REPO_DIR"
}

# Starter config: the shipped inspector.toml with this station's id and absolute /var/lib paths
# (relative paths would resolve under /etc/inspector, which the service cannot write).
write_config() {
    local cfg="$etc_dir/$station.toml" qos=1
    [[ -z "$plant_broker" ]] || qos=2  # exactly once to the plant (docs/plant.md)
    if [[ -e "$cfg" ]]; then
        note "keeping existing $cfg"
    else
        sed -e "s|^station_id = .*|station_id = \"$station\"|" \
            -e "s|station1|$station|g" \
            -e "s|\"var/spool\"|\"/var/lib/inspector/$station/spool\"|" \
            -e "s|\"var/archive\"|\"/var/lib/inspector/$station/archive\"|" \
            -e "s|\"var/demo/sku\"|\"/var/lib/inspector/skus/demo-brick\"|g" \
            -e "s|^port = 8080$|port = $web_port|" \
            -e "s|^qos = 1$|qos = $qos|" \
            -e "s|^# token_file = .*|token_file = \"/etc/inspector/secrets/$station.web-token\"|" \
            "$(config_template)" >"$cfg.new"
        # the version store lives in the station's state folder: the daemon swaps its links (activate, rollback)
        # and adds taught versions, and that folder is the only one the sandbox lets it write
        printf '\n# written by deploy/install.sh (the commented [store] above shows its other keys)\n[store]\ndir = "/var/lib/inspector/%s/skus"\n' \
            "$station" >>"$cfg.new"
        chmod 0640 "$cfg.new"
        mv "$cfg.new" "$cfg"
        note "wrote starter config $cfg: set camera, broker and SKUs, then check it"
    fi
    own "root:$SVC_USER" "$cfg"
}

write_env() {
    local env_file="$etc_dir/$station.env"
    if [[ ! -e "$env_file" ]]; then
        cat >"$env_file.new" <<EOF
# Environment for inspector@$station (systemd EnvironmentFile). Any config key can be overridden as
# INSPECTOR_<SECTION>__<KEY>; prefer editing $station.toml, keep this for per-box differences.
# INSPECTOR_MQTT__HOST=10.0.0.5
# INSPECTOR_ENGINE__BATCH=4
# CUDA_VISIBLE_DEVICES=0
# OMP_NUM_THREADS=4
EOF
        chmod 0640 "$env_file.new"
        mv "$env_file.new" "$env_file"
    fi
    own "root:$SVC_USER" "$env_file"
}

# The station page's control token (random, readable by the service user only); never replaced.
write_web_token() {
    local token_file="$secrets_dir/$station.web-token"
    if [[ ! -e "$token_file" ]]; then
        (umask 077 && od -An -tx1 -N24 /dev/urandom | tr -d ' \n' >"$token_file.new" && echo >>"$token_file.new")
        mv "$token_file.new" "$token_file"
        note "wrote the station page's control token to $token_file"
    fi
    chmod 0600 "$token_file"
    own "$SVC_USER:$SVC_USER" "$token_file"
}

# --plant-broker HOST[:PORT]: check it and the certificate files before anything is installed.
check_plant_options() {
    if [[ -z "$plant_broker" ]]; then
        if [[ -n "$plant_ca$plant_cert$plant_key" ]] || ((plant_cmd)); then
            die "--plant-ca, --plant-cert, --plant-key and --plant-cmd go with --plant-broker HOST[:PORT]"
        fi
        return 0
    fi
    plant_host="${plant_broker%%:*}"
    plant_port=8883
    [[ "$plant_broker" == *:* ]] && plant_port="${plant_broker#*:}"
    [[ "$plant_host" =~ ^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$ ]] ||
        die "--plant-broker '$plant_broker': give a host name or IPv4 address, optionally :PORT"
    if ! [[ "$plant_port" =~ ^[0-9]{1,5}$ ]] || ((plant_port < 1 || plant_port > 65535)); then
        die "--plant-broker '$plant_broker': the port must be a number from 1 to 65535"
    fi
    local option file
    for option in ca cert key; do
        file="plant_$option"
        [[ -n "${!file}" ]] || die "--plant-broker needs --plant-ca, --plant-cert and --plant-key (TLS with a client certificate)"
        [[ -f "${!file}" && -r "${!file}" ]] || die "--plant-$option '${!file}': no such readable file"
    done
    if real_root && ! getent passwd mosquitto >/dev/null; then
        die "--plant-broker: no mosquitto user here; install the local broker first (apt-get install mosquitto)"
    fi
}

# One [section] key of the station's config, empty when unset (the bridge follows the .toml, not the .env).
config_value() {
    python3 - "$etc_dir/$station.toml" "$1" "$2" <<'PY' || die "cannot read $etc_dir/$station.toml (Python 3.11+ needed)"
import sys
import tomllib

try:
    with open(sys.argv[1], "rb") as f:
        value = tomllib.load(f).get(sys.argv[2], {}).get(sys.argv[3], "")
except (OSError, tomllib.TOMLDecodeError) as exc:
    sys.exit(f"install.sh: error: {sys.argv[1]}: {exc}")
print(value)
PY
}

# The bridge of this station's topics to the plant broker, rendered from deploy/mosquitto/bridge.conf.in.
write_bridge() {
    [[ -n "$plant_broker" ]] || return 0
    local cfg="$etc_dir/$station.toml" line prefix root_topic cmd_in
    line="$(config_value line line_id)"
    prefix="$(config_value mqtt topic_prefix)"
    [[ "$line" =~ ^[A-Za-z0-9_.-]+$ ]] || die "$cfg: [line] line_id = '$line': set it (letters, digits, '_', '.', '-')"
    [[ "$prefix" =~ ^[A-Za-z0-9_./-]+$ ]] || die "$cfg: [mqtt] topic_prefix = '$prefix': set it (e.g. \"inspector\")"
    [[ "$(config_value mqtt qos)" == 2 ]] ||
        note "warning: $cfg publishes below QoS 2; set [mqtt] qos = 2 for exactly-once delivery to the plant"
    root_topic="$prefix/$line/$station"
    cmd_in="# Plant commands are not bridged in; install.sh --plant-cmd adds them (see docs/plant.md)."
    ((plant_cmd == 0)) || cmd_in="topic cmd in 2 $root_topic/ $root_topic/"
    install -d -m 0755 "$mosquitto_dir/conf.d"
    install -d -m 0750 "$mosquitto_dir/inspector" "$plant_tls_dir"
    install_file 0644 "$plant_ca" "$plant_tls_dir/ca.crt"
    install_file 0644 "$plant_cert" "$plant_tls_dir/$station.crt"
    install_file 0600 "$plant_key" "$plant_tls_dir/$station.key"
    local conf="$mosquitto_dir/conf.d/inspector-bridge-$station.conf"
    sed -e "s|@STATION@|$station|g" -e "s|@LINE@|$line|g" -e "s|@ROOT@|$root_topic|g" \
        -e "s|@HOST@|$plant_host|g" -e "s|@PORT@|$plant_port|g" -e "s|@CMD_IN@|$cmd_in|" \
        "$script_dir/mosquitto/bridge.conf.in" >"$conf.new"
    install_file 0644 "$conf.new" "$conf"
    rm -f "$conf.new"
    if real_root; then
        chown root:mosquitto "$mosquitto_dir/inspector" "$plant_tls_dir"
        chown mosquitto: "$plant_tls_dir/$station.key"
    else
        note "DESTDIR set: chown at deployment: root:mosquitto /etc/mosquitto/inspector and its plant/ (0750), mosquitto: plant/$station.key (0600)"
    fi
    note "bridge of $root_topic to $plant_host:$plant_port in /etc/mosquitto/conf.d/${conf##*/}; start it: systemctl restart mosquitto"
}

install_unit_and_docs() {
    install_file 0644 "$script_dir/inspector@.service" "$unit_path"
    if [[ -f "$(dirname "$script_dir")/docs/operations.md" ]]; then
        install_file 0644 "$(dirname "$script_dir")/docs/operations.md" "$opt_dir/docs/operations.md"
    fi
}

do_install() {
    [[ -n "$station" ]] || die "--station NAME is required (the systemd instance, e.g. station1)"
    [[ "$station" =~ ^[A-Za-z0-9_.-]+$ ]] || die "--station '$station': use letters, digits, '_', '.', '-'"
    if ! [[ "$web_port" =~ ^[0-9]{1,5}$ ]] || ((web_port < 1 || web_port > 65535)); then
        die "--web-port '$web_port': use a port number from 1 to 65535"
    fi
    [[ -e "$source_dir" ]] || die "--source '$source_dir' does not exist"
    check_plant_options
    ensure_user
    make_dirs
    make_venv
    install_unit_and_docs
    write_config
    write_env
    write_web_token
    write_bridge
    if systemd_running; then
        systemctl daemon-reload
        systemctl enable "inspector@$station.service"
        note "enabled inspector@$station; start it with: systemctl start inspector@$station"
    else
        note "systemd not managed here: run 'systemctl daemon-reload && systemctl enable inspector@$station'"
    fi
}

do_uninstall() {
    if systemd_running; then
        local units
        units="$(systemctl list-units --all --plain --no-legend 'inspector@*.service' | awk '{print $1}')"
        if [[ -n "$units" ]]; then
            # shellcheck disable=SC2086  # one unit name per word
            systemctl disable --now $units
        fi
    fi
    rm -f "$unit_path"
    rm -rf "$opt_dir"
    if ((purge)); then
        rm -rf "$etc_dir" "$lib_dir" "$cache_dir" "$plant_tls_dir"
        rm -f "$mosquitto_dir"/conf.d/inspector-bridge-*.conf
        if real_root && getent passwd "$SVC_USER" >/dev/null; then
            userdel "$SVC_USER"
        fi
        note "purged configs, secrets, SKUs, spool and archive"
    else
        note "kept $etc_dir (configs, secrets) and $lib_dir (SKUs, spool, archive); --purge removes them"
    fi
    if systemd_running; then
        systemctl daemon-reload
    fi
}

if [[ "$mode" == "uninstall" ]]; then
    do_uninstall
else
    do_install
fi

#!/usr/bin/env bash
# Add (or re-key) a broker user for a station or a PLC: password via mosquitto_passwd, rights via the ACL.
#
#   add-user.sh --role station|plc NAME [--password-file FILE] [--dir /etc/mosquitto/inspector]
#
# The password is read from FILE when it exists; otherwise a random one is generated and written to FILE
# (mode 0600), or printed once when no FILE is given. A station user must be named like the station id
# (inspector/<line>/<station>/...). The ACL block is appended only once. Reload the broker afterwards:
# systemctl reload mosquitto.
set -euo pipefail
umask 077

usage() { sed -n '2,9s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit "${1:-0}"; }
die() { echo "add-user.sh: error: $*" >&2; exit 2; }

dir="/etc/mosquitto/inspector"
role=""
name=""
password_file=""
while (($#)); do
    case "$1" in
        --role) role="${2:?--role needs station or plc}"; shift 2 ;;
        --password-file) password_file="${2:?--password-file needs a path}"; shift 2 ;;
        --dir) dir="${2:?--dir needs a directory}"; shift 2 ;;
        -h | --help) usage 0 ;;
        -*) echo "add-user.sh: unknown option '$1'" >&2; usage 2 ;;
        *) [[ -z "$name" ]] || usage 2; name="$1"; shift ;;
    esac
done
[[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || die "user name '$name': use letters, digits, '_', '.', '-'"
command -v mosquitto_passwd >/dev/null || die "mosquitto_passwd not found (apt-get install mosquitto)"

# The ACL block for one user: what each role may publish (write) and receive (read).
acl_block() {
    case "$role" in
        station)
            printf '# station: publishes its own results, reads only its own commands\nuser %s\n' "$name"
            printf 'topic write inspector/+/%s/%s\n' "$name" verdict "$name" reject "$name" mask \
                "$name" status "$name" cmd/reply
            printf 'topic read inspector/+/%s/cmd\n' "$name"
            ;;
        plc)
            printf '# plc: reads every station'\''s results, sends commands\nuser %s\n' "$name"
            printf 'topic read inspector/+/+/%s\n' verdict reject mask status cmd/reply
            printf 'topic write inspector/+/+/cmd\n'
            ;;
        *) die "--role must be station or plc, not '$role'" ;;
    esac
}

block="$(acl_block)"
install -d -m 0750 "$dir"
passwd="$dir/passwd"
acl="$dir/acl"
[[ -f "$passwd" ]] || install -m 0600 /dev/null "$passwd"
[[ -f "$acl" ]] || install -m 0600 /dev/null "$acl"

if [[ -n "$password_file" && -f "$password_file" ]]; then
    password="$(head -n 1 "$password_file")"
    [[ -n "$password" ]] || die "$password_file is empty"
else
    password="$(openssl rand -base64 24)"
    if [[ -n "$password_file" ]]; then
        install -D -m 0600 /dev/null "$password_file"
        printf '%s\n' "$password" >"$password_file"
        echo "add-user.sh: password for '$name' written to $password_file"
    else
        echo "add-user.sh: password for '$name' (shown once): $password"
    fi
fi
mosquitto_passwd -b "$passwd" "$name" "$password"

if ! grep -qx "user $name" "$acl"; then
    [[ -s "$acl" ]] && echo >>"$acl"
    printf '%s\n' "$block" >>"$acl"
fi
# Mosquitto 2.x reads these files as its own user and warns about (future versions: refuse) loose modes.
chmod 0600 "$passwd" "$acl"
if ((EUID == 0)) && getent passwd mosquitto >/dev/null; then
    chown root:mosquitto "$dir"
    chown mosquitto: "$passwd" "$acl"
fi
echo "add-user.sh: $role user '$name' ready in $passwd and $acl; run: systemctl reload mosquitto"

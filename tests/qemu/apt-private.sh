# Sourced by the QEMU set-up scripts: a private apt root in the cache, so that
# Debian 12's bookworm-backports (QEMU 10.0) and trixie's sources can be read
# without adding anything to /etc/apt or installing anything system-wide.
#
#   apt_private_init            write sources.list and fetch the package lists (once a day)
#   apt_private get ARGS...     apt-get with the private root
#   apt_private cache ARGS...   apt-cache with the private root

cache=${VIRTOPT_CACHE:-$HOME/.cache/virtopt}
apt_root="$cache/apt"

apt_private_opts() {
    echo "-o Dir::Etc::sourcelist=$apt_root/sources.list -o Dir::Etc::sourceparts=-" \
         "-o Dir::State::lists=$apt_root/lists -o Dir::Cache=$apt_root/cache" \
         "-o Debug::NoLocking=1 -o APT::Sandbox::User=root -o Acquire::Retries=3"
}

apt_private_init() {
    mkdir -p "$apt_root/lists/partial" "$apt_root/cache/archives/partial"
    local keyring=/usr/share/keyrings/debian-archive-keyring.gpg
    cat > "$apt_root/sources.list" <<SRC
deb [signed-by=$keyring] http://deb.debian.org/debian bookworm main
deb [signed-by=$keyring] http://deb.debian.org/debian bookworm-backports main
deb-src [signed-by=$keyring] http://deb.debian.org/debian bookworm-backports main
deb-src [signed-by=$keyring] http://deb.debian.org/debian trixie main
SRC
    local stamp="$apt_root/lists/.updated"
    if [ -z "$(find "$stamp" -mmin -1440 2>/dev/null)" ]; then
        # shellcheck disable=SC2046
        apt-get $(apt_private_opts) -qq update >/dev/null && touch "$stamp"
    fi
}

apt_private() {
    local tool=$1
    shift
    # shellcheck disable=SC2046
    "apt-$tool" $(apt_private_opts) "$@"
}

# The newest QEMU 10.0 version in bookworm-backports, e.g. 1:10.0.2+ds-2+deb13u1~bpo12+1.
qemu_current_version() {
    apt_private cache madison qemu-utils | awk -F'|' '$2 ~ /~bpo12/ && $2 ~ /:10\.0\./ {gsub(/ /, "", $2); print $2; exit}'
}

# The nginx side of the maintainer scripts, put by scripts/package into each script that
# says #AFR_NGINX_RELOAD#, so all share one text. nginx is reloaded, never restarted, and
# a configuration change is kept only when `nginx -t` passes with it.

# afr_nginx_t: `nginx -t` passes (or there is no nginx); what it said is in $afr_nginx_said.
afr_nginx_t() {
    command -v nginx >/dev/null 2>&1 || return 0
    afr_nginx_said=$(nginx -t -q 2>&1)
}

# afr_nginx_reload: reloads a running nginx once `nginx -t` passes.
#   - Debian's nginx declares the nginx-reload trigger (what Debian's own libnginx-mod-*
#     packages use): nginx reloads once, after every package of this run is configured.
#   - nginx.org's nginx has no trigger: reload it through its service, if it runs.
# A failing `nginx -t` is printed and nginx is left running on the configuration it has.
afr_nginx_reload() {
    command -v nginx >/dev/null 2>&1 || return 0
    if ! afr_nginx_t; then
        echo "afr: 'nginx -t' fails, so nginx was not reloaded (it keeps running as it was):" >&2
        echo "$afr_nginx_said" >&2
        return 0
    fi
    if dpkg-query --control-show nginx triggers 2>/dev/null | grep -qw nginx-reload; then
        dpkg-trigger --no-await nginx-reload
    elif invoke-rc.d --quiet nginx status >/dev/null 2>&1; then
        invoke-rc.d nginx reload || true
    fi
}

# afr_link_enable LINK TARGET: LINK -> TARGET, kept only if `nginx -t` passes with it.
# Whatever is at LINK already (the administrator's, or a dangling link) is left alone.
afr_link_enable() {
    if [ -e "$1" ] || [ -L "$1" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$1")"
    ln -s "$2" "$1"
    if ! afr_nginx_t; then
        rm -f "$1"
        echo "afr: 'nginx -t' fails with $1, so it was not enabled:" >&2
        echo "$afr_nginx_said" >&2
        return 1
    fi
}

# afr_link_disable LINK: set aside as LINK.removed, for a reinstall to bring back.
afr_link_disable() {
    if [ -L "$1" ]; then
        mv -f "$1" "$1.removed"
    fi
}

# afr_link_restore LINK TARGET: back from LINK.removed (if `nginx -t` passes with it);
# false when there was nothing set aside.
afr_link_restore() {
    [ -L "$1.removed" ] || return 1
    rm -f "$1.removed"
    afr_link_enable "$1" "$2" || true
}

# afr_link_configure LINK TARGET "$1" "$2" (a postinst's arguments): what dh_nginx does
# with a package's link, nginx -t guarded. A link a removal (or an aborted one) set
# aside comes back; a fresh install makes it; an upgrade leaves the administrator's choice.
afr_link_configure() {
    if ! afr_link_restore "$1" "$2" && [ "$3" = configure ] && [ -z "$4" ]; then
        afr_link_enable "$1" "$2"
    fi
}
